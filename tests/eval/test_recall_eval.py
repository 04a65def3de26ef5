"""Recall by distance and the retention gate."""

import pytest

from matvlm.eval.metrics import score_records
from matvlm.eval.recall import describe_flags, flag_families, recall_by_distance


def _recall(i, distance):
    return {"id": f"r{i}", "family": "recall", "metric": "exact", "answers": [str(i)], "distance": distance}


def test_recall_accuracy_is_broken_down_by_distance():
    records = [_recall(0, 0), _recall(1, 0), _recall(2, 30), _recall(3, 120), _recall(4, 700), _recall(5, 900),
               {"id": "a", "family": "count", "metric": "exact", "answers": ["3"]}]
    preds = {"r0": "0", "r1": "1", "r2": "2", "r3": "99", "r4": "4", "r5": "0", "a": "3"}
    res = score_records(records, preds)
    bins = recall_by_distance(records, res["records"])
    assert list(bins) == ["0", "1-49", "50-199", "500+"]  # the empty 200-499 bin is left out
    assert bins["0"] == {"n": 2, "score": 1.0, "lo": 0, "hi": 1}
    assert bins["50-199"]["score"] == 0.0 and bins["500+"]["score"] == 0.5
    assert recall_by_distance([r for r in records if r["family"] == "count"], res["records"]) == {}


def test_recall_bins_come_from_evaluate_results():
    """A record without a distance (an older world, another family) is simply not binned."""
    records = [_recall(0, 10), {**_recall(1, 10), "distance": None}]
    res = score_records(records, {"r0": "0", "r1": "1"})
    assert recall_by_distance(records, res["records"])["1-49"]["n"] == 1


def _results(scores, bins=None):
    out = {"families": {f: {"score": s, "n": 10} for f, s in scores.items()}}
    if bins:
        out["recall_by_distance"] = {k: {"score": v, "n": 5} for k, v in bins.items()}
    return out


def test_families_below_ninety_percent_of_the_teacher_are_flagged_worst_first():
    teacher = _results({"count": 0.9, "ocr": 0.8, "recall": 1.0, "caption": 0.0}, {"0": 1.0, "500+": 1.0})
    student = _results({"count": 0.85, "ocr": 0.5, "recall": 0.95}, {"0": 1.0, "500+": 0.6})
    flags = flag_families(teacher, student)
    # count keeps 94% and recall 95% overall, but its longest bin 60%; caption at 0 has nothing to keep
    assert [f["family"] for f in flags] == ["recall@500+", "ocr"]
    assert flags[1]["retention"] == pytest.approx(0.625)
    assert "ocr 62%" in describe_flags(flags)
    missing = flag_families(teacher, _results({"count": 0.9}))
    assert {"family": "ocr", "teacher": 0.8, "student": None, "retention": None} in missing
    assert flag_families(teacher, teacher) == [] and "every family" in describe_flags([])
