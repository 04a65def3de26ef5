"""The ablation suite's bookkeeping: calls with --only merge into one results.json, in the suite's order."""

import json
from argparse import Namespace
from pathlib import Path

from .conftest import load_benchmark


def load_suite():
    return load_benchmark("distill_ablations")


def test_split_runs_merge_and_keep_the_teacher_eval(tmp_path, monkeypatch):
    suite = load_suite()
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "matvlm.json").write_text(json.dumps({"train_tokens": 1000}))
    evaluated = []

    def fake_eval(model_dir, args, out):
        evaluated.append(Path(out).name)
        return {"average": 0.5, "families": {"attribute": 0.5}}

    def fake_variant(name, overrides, args):
        return {"name": name, "overrides": overrides, "returncode": 0, "eval": {"average": 0.4, "families": {}}}

    monkeypatch.setattr(suite, "evaluate", fake_eval)
    monkeypatch.setattr(suite, "run_variant", fake_variant)
    args = dict(teacher=str(teacher), world="w", out=str(tmp_path / "abl"), steps=1, batch_size=2, lr=1e-3,
                parallel=2, workers=1, eval_records=9)
    suite.run(Namespace(**args, only="ratio_50,loss_kl"))
    suite.run(Namespace(**args, only="ratio_12_5,loss_kl"))
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["ratio_12.5", "ratio_50", "loss_kl"]
    assert evaluated == ["teacher_eval.json"]  # the teacher is scored once, never inside its own folder
    assert not (teacher / "eval.json").exists()
    # New weights at the same path: a fresh teacher eval, and the earlier variants are dropped.
    (teacher / "model.safetensors").write_bytes(b"other weights")
    suite.run(Namespace(**args, only="ratio_50"))
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["ratio_50"]
    assert evaluated == ["teacher_eval.json", "teacher_eval.json"]


def test_report_smooths_over_the_length_cycle_and_counts_steps_to_a_kl():
    suite = load_suite()
    kl = [1.0] * 50 + [0.2] * 50 + [0.05] * 50
    assert abs(suite.smoothed(kl, 100) - 0.2) < 1e-12
    assert suite.steps_to(kl, 0.1) == 134  # (16 x 0.2 + 34 x 0.05) / 50 = 0.098
    assert suite.steps_to(kl, 0.01) is None
