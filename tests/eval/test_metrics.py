"""Hand-computed checks for matvlm.eval.metrics and matvlm.eval.report."""

from __future__ import annotations

import json
import math
import os

import pytest
from rich.console import Console

from matvlm.eval.metrics import (
    bleu4,
    caption_scores,
    exact_match,
    multiple_choice_accuracy,
    multiple_choice_score,
    normalize_answer,
    parse_choice,
    parse_yes_no,
    rouge_l,
    score_record,
    score_records,
    token_f1,
    vqa_accuracy,
    yes_no_scores,
)
from matvlm.eval.report import compare_table, results_table
from matvlm.io import write_json_atomic

# --------------------------------------------------------------------------
# normalize_answer / exact_match
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Three.", "3"),
        ("  Three. ", "3"),
        ("The red circle", "red circle"),
        ("An apple!", "apple"),
        ('"Hello,   World!"', "hello world"),
        ("\u201cStop\u201d", "stop"),
        ("twenty-one", "21"),
        ("Twenty", "20"),
        ("the red one", "red 1"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("10:30", "10:30"),
        ("1/2", "1/2"),
        ("McDonald\u2019s", "mcdonald's"),
        ("U.S.A.", "usa"),
        ("COVID-19", "covid 19"),
        ("t-shirt", "t shirt"),
        ("50%", "50%"),
        ("a", "a"),  # only an article: kept so "A" stays comparable
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_keeps_distinct_answers_distinct() -> None:
    assert normalize_answer("3.5") != normalize_answer("35")
    assert normalize_answer("10:30") != normalize_answer("1030")
    assert normalize_answer("red") != normalize_answer("red circle")
    assert normalize_answer("thirteen") != normalize_answer("30")


def test_exact_match() -> None:
    assert exact_match("Three.", ["3"]) == 1.0
    assert exact_match("The red circle", "red circle") == 1.0
    assert exact_match("t-shirt", ["shirt", "T shirt"]) == 1.0
    assert exact_match("red", ["red circle"]) == 0.0
    assert exact_match("4", ["three", "five"]) == 0.0
    assert exact_match("", ["yes"]) == 0.0


# --------------------------------------------------------------------------
# vqa_accuracy
# --------------------------------------------------------------------------

TEN = ["two", "2", "2", "3", "3", "4", "four", "4", "4", "5"]


def test_vqa_accuracy_consensus() -> None:
    assert vqa_accuracy("2", TEN) == 1.0  # "two", "2", "2": three annotators
    assert vqa_accuracy("Three", TEN) == pytest.approx(2 / 3)
    assert vqa_accuracy("Five.", TEN) == pytest.approx(1 / 3)
    assert vqa_accuracy("four", TEN) == 1.0  # four matches, capped at 1
    assert vqa_accuracy("6", TEN) == 0.0


def test_vqa_accuracy_short_reference_lists() -> None:
    # One reference: identical to exact match.
    assert vqa_accuracy("Three.", ["3"]) == 1.0
    assert vqa_accuracy("4", ["3"]) == 0.0
    # Two references: each is half the votes.
    assert vqa_accuracy("red", ["red", "blue"]) == 0.5
    assert vqa_accuracy("red", ["Red", "red."]) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_vqa_accuracy_leave_one_out() -> None:
    # 2 matches of 10: 2 held-out sets give 1/3, 8 give 2/3 -> 0.6 (official value).
    assert vqa_accuracy("3", TEN, leave_one_out=True) == pytest.approx(0.6)
    # 3 matches: 3 sets give 2/3, 7 give 1 -> 0.9.
    assert vqa_accuracy("2", TEN, leave_one_out=True) == pytest.approx(0.9)
    assert vqa_accuracy("6", TEN, leave_one_out=True) == 0.0


# --------------------------------------------------------------------------
# yes / no
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is.", "yes"),
        ("yes", "yes"),
        ("No.", "no"),
        ("NO", "no"),
        ("There is no dog in the image.", "no"),
        ("The image does not contain a cat.", "no"),
        ("Not really.", "no"),
        ("There is a dog in the image.", "yes"),
        ("I think yes.", "yes"),
        ("I cannot tell from the picture.", None),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_yes_no(text: str, expected: str | None) -> None:
    assert parse_yes_no(text) == expected


def test_yes_no_scores_confusion_matrix() -> None:
    refs = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "yes"]
    preds = [
        "Yes.",              # TP
        "yes, there is",     # TP
        "No",                # FN
        "I cannot tell",     # unparsed on a yes question -> FN
        "no",                # TN
        "No, there isn't.",  # TN
        "Yes",               # FP
        "There is no cat.",  # TN
        "maybe",             # unparsed on a no question -> wrong, not FP
        "There is a cat.",   # TP
    ]
    s = yes_no_scores(preds, refs)
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (3, 1, 3, 2)
    assert s["unparsed"] == 2
    assert s["n"] == 10
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(0.4)


def test_yes_no_scores_edge_cases() -> None:
    s = yes_no_scores(["no", "no"], ["no", "no"])
    assert s["accuracy"] == 1.0 and s["precision"] == 0.0 and s["f1"] == 0.0
    with pytest.raises(ValueError):
        yes_no_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        yes_no_scores(["yes"], ["banana"])


# --------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------

CHOICES = ["red", "blue circle", "red circle", "green"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[d]", "D"),
        ("**C**", "C"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("answer: c.", "C"),
        ("I choose option A because it is red.", "A"),
        ("C. red circle", "C"),
        ("(b) blue circle", "B"),
        ("B because it is round", "B"),
        ("I think D.", "D"),
        ("red circle", "C"),           # option text itself
        ("The red circle.", "C"),      # option text after normalisation
        ("Blue circle!", "B"),
        ("It is the green one", "D"),  # option text inside a sentence
        ("The answer is a red circle", "C"),  # "a" is an article here, not A
        ("A dog", None),               # article, and no option text
        ("E", None),                   # outside the four options
        ("I don't know", None),
        ("", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text, CHOICES) == expected


def test_parse_choice_without_choices_allows_letters_only() -> None:
    assert parse_choice("E", None) == "E"
    assert parse_choice("red circle", None) is None


def test_multiple_choice_accuracy() -> None:
    preds = ["B", "The answer is C", "green", "no idea"]
    answers = ["B", "A", "D", "A"]  # references as letters ...
    assert multiple_choice_accuracy(preds, answers, [CHOICES] * 4) == pytest.approx(0.5)
    # ... or as the option text
    assert multiple_choice_score("(C)", ["red circle"], CHOICES) == 1.0
    assert multiple_choice_score("(A)", ["red circle"], CHOICES) == 0.0
    with pytest.raises(ValueError):
        multiple_choice_score("A", ["purple"], CHOICES)


# --------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------


def test_rouge_l_hand_computed() -> None:
    # Tokens: [red dog runs fast] vs [red dog walks very fast]; LCS = red dog fast = 3.
    # P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 0.9/1.35 = 2/3.
    pred, ref = "A red dog runs fast", "The red dog walks very fast."
    assert rouge_l(pred, ref) == pytest.approx(2 / 3)
    # beta weights recall: F = (1+b^2)PR/(R+b^2 P) with b=2 -> 5*0.45/(0.6+3) = 0.625.
    assert rouge_l(pred, ref, beta=2.0) == pytest.approx(0.625)
    # LCS is order-sensitive, unlike bag-of-words F1.
    assert rouge_l("fast dog red", "red dog fast") == pytest.approx(1 / 3)
    # Best over references.
    assert rouge_l(pred, ["cat sleeps", ref, "blue sky"]) == pytest.approx(2 / 3)
    assert rouge_l("cat", "dog") == 0.0
    assert rouge_l("", "dog") == 0.0


def test_token_f1_and_bleu4_hand_computed() -> None:
    # Counts dog:1 cat:1 shared -> P = 2/3, R = 2/4, F1 = 4/7.
    assert token_f1("dog dog cat", "dog cat cat bird") == pytest.approx(4 / 7)
    assert token_f1("fast dog red", "red dog fast") == 1.0
    # p1 = 4/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1); BP = exp(1 - 5/4).
    expected = math.exp(-0.25) * (1 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert bleu4("red dog runs fast", "red dog runs very fast") == pytest.approx(expected)
    assert bleu4("a red dog runs fast", ["red dog runs fast"]) == pytest.approx(1.0)
    assert bleu4("cat", "dog") == 0.0
    scores = caption_scores("A red dog runs fast", "The red dog walks very fast.")
    assert set(scores) == {"rouge_l", "token_f1", "bleu4"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


# --------------------------------------------------------------------------
# score_records
# --------------------------------------------------------------------------


def _rec(rid, family, metric, answers, **extra):
    return {"id": rid, "image": extra.pop("image", f"{rid}.jpg"), "conversations": [],
            "family": family, "metric": metric, "answers": answers, **extra}


RECORDS = [
    _rec("r1", "gqa", "exact", ["red circle"]),
    _rec("r2", "gqa", "exact", ["3"]),
    _rec("r3", "gqa", "exact", ["left"]),  # no prediction
    _rec("r4", "textvqa", "vqa", TEN),
    _rec("r5", "textvqa", "vqa", ["stop", "stop", "stop sign"]),
    _rec("r6", "pope", "yesno", ["yes"], subset="random"),
    _rec("r7", "pope", "yesno", ["no"], subset="random"),
    _rec("r8", "pope", "yesno", ["no"], subset="popular"),
    _rec("r9", "pope", "yesno", ["yes"], subset="popular"),
    _rec("r10", "sqa", "mc", ["B"], choices=["cat", "dog"]),
    _rec("r11", "sqa", "mc", ["dog"], choices=["cat", "dog"]),
    _rec("r12", "sqa", "mc", ["A"], choices=["cat", "dog"]),
    _rec("r13", "cap", "caption", ["The red dog walks very fast."]),
]
PREDS = {
    "r1": "The red circle.", "r2": "two",
    "r4": "2", "r5": "Stop sign",
    "r6": "Yes", "r7": "yes", "r8": "No", "r9": "Yes, it is.",
    "r10": "The answer is (B).", "r11": "A", "r12": "hmm",
    "r13": "a red dog runs fast",
}


def test_score_records_aggregation() -> None:
    res = score_records(RECORDS, PREDS)
    fam = res["families"]
    assert res["missing"] == ["r3"]
    assert res["n"] == 12

    assert fam["gqa"]["metric"] == "exact"
    assert fam["gqa"]["n"] == 2 and fam["gqa"]["missing"] == 1
    assert fam["gqa"]["score"] == pytest.approx(0.5)

    assert fam["textvqa"]["score"] == pytest.approx((1.0 + 1 / 3) / 2)

    pope = fam["pope"]  # TP=2 (r6, r9), FP=1 (r7), TN=1 (r8)
    assert pope["score"] == pytest.approx(0.75)
    assert pope["precision"] == pytest.approx(2 / 3)
    assert pope["recall"] == pytest.approx(1.0)
    assert pope["f1"] == pytest.approx(0.8)
    assert pope["yes_ratio"] == pytest.approx(0.75)
    assert pope["subsets"]["random"]["score"] == pytest.approx(0.5)
    assert pope["subsets"]["popular"]["score"] == pytest.approx(1.0)
    assert pope["subsets"]["popular"]["n"] == 2

    assert fam["sqa"]["score"] == pytest.approx(1 / 3)
    assert fam["sqa"]["unparsed"] == 1

    assert fam["cap"]["score"] == pytest.approx(2 / 3)
    assert "token_f1" in fam["cap"] and "bleu4" in fam["cap"]

    assert res["average"] == pytest.approx((0.5 + 2 / 3 + 0.75 + 1 / 3 + 2 / 3) / 5)
    for f in fam.values():
        assert 0.0 <= f["score"] <= 1.0


def test_score_records_per_record_rows() -> None:
    rows = {r["id"]: r for r in score_records(RECORDS, PREDS)["records"]}
    assert "r3" not in rows
    assert rows["r1"]["normalized"] == "red circle"
    assert rows["r1"]["correct"] is True and rows["r1"]["score"] == 1.0
    assert rows["r2"]["correct"] is False
    assert rows["r5"]["score"] == pytest.approx(1 / 3) and rows["r5"]["correct"] is False
    assert rows["r9"]["parsed"] == "yes" and rows["r9"]["label"] == "yes"
    assert rows["r11"]["parsed"] == "A" and rows["r11"]["label"] == "B"
    assert rows["r12"]["parsed"] is None
    assert rows["r13"]["correct"] is None
    assert rows["r6"]["subset"] == "random"
    json.dumps(rows)  # rows are JSON-ready


def test_score_records_missing_as_wrong_and_int_ids() -> None:
    res = score_records(RECORDS, PREDS, missing_as_wrong=True)
    assert res["missing"] == ["r3"]
    assert res["families"]["gqa"]["n"] == 3
    assert res["families"]["gqa"]["score"] == pytest.approx(1 / 3)

    recs = [_rec(7, "gqa", "exact", ["yes"])]
    assert score_records(recs, {"7": "Yes"})["families"]["gqa"]["score"] == 1.0
    empty = score_records(recs, {})
    assert empty["families"]["gqa"]["n"] == 0 and empty["average"] == 0.0


def test_score_records_acc_plus() -> None:
    recs = [
        _rec("m1", "mme", "yesno", ["yes"], image="img1.jpg"),
        _rec("m2", "mme", "yesno", ["no"], image="img1.jpg"),
        _rec("m3", "mme", "yesno", ["yes"], image="img2.jpg"),
        _rec("m4", "mme", "yesno", ["no"], image="img2.jpg"),
    ]
    res = score_records(recs, {"m1": "Yes", "m2": "No", "m3": "Yes", "m4": "Yes"})
    assert res["families"]["mme"]["score"] == pytest.approx(0.75)
    assert res["families"]["mme"]["acc_plus"] == pytest.approx(0.5)


def test_score_records_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mixes metrics"):
        score_records([_rec("a", "f", "exact", ["x"]), _rec("b", "f", "vqa", ["x"])], {})
    with pytest.raises(ValueError, match="duplicate"):
        score_records([_rec("a", "f", "exact", ["x"]), _rec("a", "f", "exact", ["y"])], {})
    with pytest.raises(ValueError, match="unknown metric"):
        score_record(_rec("a", "f", "bleu", ["x"]), "x")
    with pytest.raises(ValueError, match="no answers"):
        score_record(_rec("a", "f", "exact", []), "x")


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_results_table() -> None:
    res = score_records(RECORDS, PREDS)
    table = results_table(res, "teacher")
    assert table.row_count == len(res["families"]) + 1
    text = _render(table)
    assert "teacher" in text and "pope" in text and "Average" in text
    assert "75.0" in text  # pope accuracy
    assert "F1 80.0" in text
    assert "random 50.0" in text


def test_compare_table_retention() -> None:
    teacher = {"families": {"gqa": {"metric": "exact", "score": 0.8, "n": 10},
                            "pope": {"metric": "yesno", "score": 0.5, "n": 10}},
               "average": 0.65}
    hybrid = {"families": {"gqa": {"metric": "exact", "score": 0.6, "n": 10}}, "average": 0.6}
    table = compare_table({"teacher": teacher, "hybrid": hybrid})
    assert len(table.columns) == 2 + 2 + 1
    assert table.row_count == 3
    text = _render(table)
    assert "75.0" in text  # gqa retention 0.6 / 0.8
    assert "\u2014" in text  # pope missing for hybrid
    assert "left out: pope" in text
    # Average over shared families only: 80.0 and 60.0, retention 75.0.
    avg_line = next(line for line in text.splitlines() if "Average" in line)
    assert "80.0" in avg_line and "60.0" in avg_line and "75.0" in avg_line


# --------------------------------------------------------------------------
# write_json_atomic
# --------------------------------------------------------------------------


def test_write_json_atomic_roundtrip(tmp_path) -> None:
    target = tmp_path / "sub" / "results.json"
    obj = {"average": 0.5, "names": ["r1", "\u00e9"], "nested": {"n": 3}}
    assert write_json_atomic(target, obj) == target
    assert json.loads(target.read_text(encoding="utf-8")) == obj
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text(encoding="utf-8")) == {"v": 2}
    assert os.listdir(target.parent) == ["results.json"]  # no temp file left
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_json_atomic_failure_keeps_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    write_json_atomic(target, {"old": True})

    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"old": True}

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_json_atomic_numpy_values(tmp_path) -> None:
    np = pytest.importorskip("numpy")
    target = tmp_path / "r.json"
    write_json_atomic(target, {"score": np.float32(0.5), "arr": np.arange(3)})
    assert json.loads(target.read_text()) == {"score": 0.5, "arr": [0, 1, 2]}
