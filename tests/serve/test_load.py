"""benchmarks/serve_load.py on the CPU with the shipped teacher and a hybrid: small N, every answer checked."""

import json

from ..conftest import load_benchmark


def test_serve_load_small_cpu_run(tmp_path):
    bench = load_benchmark("serve_load")
    out = tmp_path / "load"
    assert bench.main(["--clients", "4", "--requests", "8", "--prompts", "4", "--max-batch", "3",
                       "--time-limit", "240", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    for kind in ("teacher", "hybrid"):
        run = result["runs"][kind]
        assert run["requests"] == 8 and not run["errors"] and not run["mismatched"] and run["tokens"] > 0
        assert run["ttft_p50_s"] <= run["latency_p99_s"]
