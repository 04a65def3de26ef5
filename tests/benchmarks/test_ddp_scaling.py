"""benchmarks/ddp_scaling.py on the CPU: 1 process and 2 (DDP, gloo) at the same global batch give the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import launch_on_cpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ddp_scaling.py"


def _launch(n: int, out: Path) -> dict:
    args = ["--shape", "tiny", "--out", str(out), "--global-batch", "4", "--tokens", "32", "--steps", "2",
            "--warmup", "1"]
    proc = launch_on_cpu(n, [str(SCRIPT), *args], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_match_one_and_compare_reports_scaling(tmp_path):
    one, two = _launch(1, tmp_path / "one.json"), _launch(2, tmp_path / "two.json")
    assert (one["num_processes"], one["per_process_batch"]) == (1, 4)
    assert (two["num_processes"], two["per_process_batch"], len(two["devices"])) == (2, 2, 2)  # really 2 processes
    assert len(one["losses"]) == len(two["losses"]) == 2
    for a, b in zip(one["losses"] + one["warmup_losses"], two["losses"] + two["warmup_losses"]):
        assert a > 0 and abs(a - b) <= 1e-5 * abs(a)
    assert one["tokens_per_second"] > 0 and two["tokens_per_second"] > 0

    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(tmp_path / "one.json"),
                           str(tmp_path / "two.json"), "--out", str(out)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["scaling"] == pytest.approx(two["tokens_per_second"] / one["tokens_per_second"], rel=1e-2)
    assert result["num_processes"] == [1, 2] and result["max_rel_loss_diff"] <= 1e-5


def test_indivisible_global_batch_is_refused(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--out", str(tmp_path / "x.json"),
                           "--global-batch", "4", "--micro-batch", "3"],
                          capture_output=True, text=True, check=False, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "does not divide the per-process batch 4" in proc.stderr
