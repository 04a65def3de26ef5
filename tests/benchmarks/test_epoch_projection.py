"""The epoch projection from a data set's exact token counts (benchmarks/epoch_projection.py)."""

import json

import pytest

from matvlm.data.llava import SupervisedDataset, load_records
from matvlm.io import load_processor

from ..conftest import load_benchmark
from ..distill.test_distill import tiny_teacher  # noqa: F401  (the module-scoped tiny teacher fixture)


def test_token_counts_are_the_lengths_training_sees(tiny_teacher):  # noqa: F811
    world, teacher = tiny_teacher
    processor = load_processor(teacher)
    records = load_records(world / "train.json")
    config = json.loads((teacher / "config.json").read_text())
    def dataset(max_length):
        return SupervisedDataset(records, [world / "images"], processor.tokenizer, processor.image_processor, "phi",
                                 config["image_seq_length"], max_length=max_length)

    whole = dataset(1024)
    counts = whole.token_counts()
    assert counts == [whole[i]["length"] for i in range(len(whole))]
    assert min(counts) > config["image_seq_length"]
    sample = whole.token_counts(sample=10, seed=1)
    assert len(sample) == 10 and set(sample) <= set(counts)
    # Cut at max_length as training cuts; records left without an answer token are not counted.
    cut_at = sorted(counts)[len(counts) // 2]
    cut = dataset(cut_at).token_counts()
    kept = [n for n in counts if n <= cut_at]
    assert max(cut) == cut_at and len(kept) <= len(cut) < len(counts)


def test_projection_divides_the_epoch_tokens_by_the_measured_speed(tiny_teacher, tmp_path):  # noqa: F811
    world, teacher = tiny_teacher
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"tokens_per_second": 250.0, "device": "test"}))
    out = tmp_path / "projection.json"
    result = load_benchmark("epoch_projection").main(["--teacher", str(teacher), "--data", str(world / "train.json"), "--bench", str(bench),
                             "--sample", "0", "--out", str(out)])
    records = load_records(world / "train.json")
    assert result["records"] == result["sampled"] == len(records) and result["skipped_bad"] == 0
    assert result["epoch_tokens"] == pytest.approx(result["mean_tokens"] * len(records), rel=1e-3)
    assert result["epoch_hours"] == pytest.approx(result["epoch_tokens"] / 250.0 / 3600, abs=0.01)
    assert result["median_tokens"] <= result["p90_tokens"] <= result["max_tokens"] <= 2048
    assert json.loads(out.read_text())["epoch_tokens"] == result["epoch_tokens"]
