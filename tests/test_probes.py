"""The teacher probes' summaries (benchmarks/probes) on hand-made predictions."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks" / "probes"))

import ocr_errors  # noqa: E402
import recall_errors  # noqa: E402


def _ocr(rid: str, string: str, text_type: str) -> dict:
    return {"id": rid, "answers": [string], "text_type": text_type, "scene": {"text": {"string": string}}}


def test_ocr_errors_splits_held_out_words_from_seen_ones():
    records = [_ocr("a", "candle", "word"), _ocr("b", "garden 12", "phrase"), _ocr("c", "castle", "word"),
               _ocr("d", "4821", "number")]
    predictions = {"a": "castle", "b": "garden 12", "c": "castle", "d": "4871"}
    out = ocr_errors.summarise(records, predictions, heldout_words={"candle", "garden"})
    acc = out["accuracy"]
    assert acc["all"] == {"score": 0.5, "n": 4}
    assert acc["held-out word"] == {"score": 0.5, "n": 2} and acc["held-out word, word"]["score"] == 0.0
    assert acc["seen words only"] == {"score": 0.5, "n": 2} and acc["seen words only, number"]["score"] == 0.0
    assert [m["id"] for m in out["misread"]] == ["a", "d"]


def _recall(rid: str, values: list[int], answer: int, distance: int) -> dict:
    facts = "".join(f" The key for the red {noun} is {v}." for noun, v in zip(["door", "box", "gate"], values))
    return {"id": rid, "answers": [str(answer)], "distance": distance,
            "conversations": [{"from": "human", "value": "<image>\nRemember these facts." + facts}]}


def test_recall_errors_counts_stated_numbers_and_chance():
    records = [_recall("a", [3, 7], 3, 10), _recall("b", [1, 2, 5], 5, 300), _recall("c", [8, 9], 9, 40)]
    out = recall_errors.summarise(records, {"a": "3", "b": "2", "c": "11"})
    assert out["accuracy"] == pytest.approx(1 / 3) and out["answers_a_stated_number"] == pytest.approx(2 / 3)
    assert out["chance_of_a_random_stated_number"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert out["by_facts"] == {"2": {"accuracy": 0.5, "n": 2}, "3": {"accuracy": 0.0, "n": 1}}
    assert out["by_distance_words"]["<50"] == {"accuracy": 0.5, "n": 2}


def test_recall_errors_says_which_wrong_fact_is_picked():
    # Facts: red door 3 (asked), red box 7, blue door 9. The answer 9 shares the noun, is last, not first.
    facts = " The key for the red door is 3. The key for the red box is 7. The key for the blue door is 9."
    record = {"id": "a", "answers": ["3"], "distance": 0,
              "conversations": [{"from": "human", "value": "<image>\nRemember these facts." + facts}]}
    picks = recall_errors.summarise([record], {"a": "9"})["wrong_stated_picks"]
    assert picks["n"] == 1
    assert picks["same noun"] == {"share": 1.0, "random_wrong_pick": 0.5}
    assert picks["same colour"] == {"share": 0.0, "random_wrong_pick": 0.5}
    assert picks["last"]["share"] == 1.0 and picks["first"] == {"share": 0.0, "random_wrong_pick": 0.0}
