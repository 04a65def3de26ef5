"""Offline answer metrics shared by the teacher and every hybrid.

Every model is scored by the same functions, so differences in the numbers
come from the models and not from answer handling. All scores are in [0, 1].

Metrics per record (``record["metric"]``):

* ``exact``   -- normalised prediction equals any normalised reference.
* ``vqa``     -- VQAv2 consensus accuracy over the annotator answers.
* ``yesno``   -- yes/no parsed from free text (POPE, MME).
* ``mc``      -- option letter parsed from free text (MMBench, ScienceQA, MMMU).
* ``caption`` -- ROUGE-L F (plus token F1 and BLEU-4 as extras).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from matvlm.eval.recall import recall_by_distance

__all__ = [
    "METRICS",
    "normalize_answer",
    "exact_match",
    "vqa_accuracy",
    "parse_yes_no",
    "yes_no_scores",
    "parse_choice",
    "multiple_choice_score",
    "multiple_choice_accuracy",
    "rouge_l",
    "token_f1",
    "bleu4",
    "caption_scores",
    "score_record",
    "score_records",
]

METRICS = ("exact", "vqa", "yesno", "mc", "caption")

# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_ARTICLES = frozenset({"a", "an", "the"})

# Typographic variants that models and OCR annotations mix freely.
_CHAR_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
    "\u2212": "-",
})
_EDGE_QUOTES = "\"'`"
_TRAILING_PUNCT = ".,!?;:"
# Symbols that carry meaning in OCR / numeric answers wherever they stand.
_KEEP_SYMBOLS = frozenset("$%#&@+")
# Joiners kept only between two alphanumerics ("10:30", "1/2", "don't").
_KEEP_BETWEEN = frozenset(":/'")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _clean_unicode(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_CHAR_MAP)


def _strip_edges(text: str) -> str:
    """Drop surrounding whitespace, quotes and trailing sentence punctuation."""
    while True:
        new = text.strip().strip(_EDGE_QUOTES).rstrip(_TRAILING_PUNCT).strip()
        if new == text:
            return text
        text = new


def _map_chars(text: str) -> str:
    out: list[str] = []
    n = len(text)
    for i, ch in enumerate(text):
        prev = text[i - 1] if i > 0 else ""
        nxt = text[i + 1] if i + 1 < n else ""
        if ch.isalnum() or ch.isspace() or ch in _KEEP_SYMBOLS:
            out.append(ch)
        elif ch == ".":
            if nxt.isdigit():
                out.append(ch)  # decimal point: "3.5", ".5"
            elif prev.isalnum() and nxt.isalnum():
                pass  # "u.s.a" -> "usa", as the VQA evaluator does
            else:
                out.append(" ")
        elif ch in _KEEP_BETWEEN and prev.isalnum() and nxt.isalnum():
            out.append(ch)
        else:
            # Hyphens, underscores, brackets, quotes, commas...: a word break.
            out.append(" ")
    return "".join(out)


def _numbers_to_digits(tokens: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _TENS:
            value = _TENS[tok]
            # "twenty one" (also from "twenty-one") -> "21"
            if i + 1 < len(tokens) and 1 <= _UNITS.get(tokens[i + 1], 0) <= 9:
                value += _UNITS[tokens[i + 1]]
                i += 1
            out.append(str(value))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, used for every model and metric.

    Steps: Unicode NFKC with curly quotes/dashes made plain; lower case;
    surrounding quotes and trailing ``.,!?;:`` removed; thousands commas
    dropped ("1,000" -> "1000"); number words zero..ninety-nine to digits;
    articles a/an/the dropped (unless the answer is only articles, so that a
    bare "a" stays comparable); whitespace collapsed.

    Characters: letters and digits always stay, as do ``$ % # & @ +``.
    ``: / '`` stay only between alphanumerics ("10:30", "1/2", "mcdonald's").
    A period stays before a digit (decimals) and is deleted between letters
    ("U.S.A." -> "usa"). Hyphens and underscores become spaces, like the
    official VQA evaluator, so "t-shirt" == "t shirt" and "covid-19" ==
    "covid 19"; annotators write these both ways, and the hyphen alone never
    distinguishes two OCR readings in practice.
    """
    text = _strip_edges(_clean_unicode(text).lower())
    text = _THOUSANDS.sub("", text)
    tokens = _numbers_to_digits(_map_chars(text).split())
    kept = [t for t in tokens if t not in _ARTICLES]
    return " ".join(kept if kept else tokens)


# --------------------------------------------------------------------------
# Short-answer accuracy
# --------------------------------------------------------------------------


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in _as_list(answers)))


def vqa_accuracy(
    pred: str, answers: str | Sequence[str], *, leave_one_out: bool = False
) -> float:
    """VQAv2 consensus accuracy: ``min(1, matches / min(3, len(answers)))``.

    ``answers`` is the list of *annotator* answers, duplicates kept (VQAv2 and
    TextVQA have ten). A prediction given by three annotators scores 1, by one
    annotator 1/3. The denominator shrinks for short lists so that a single
    reference behaves exactly like :func:`exact_match`; with two references
    one match scores 0.5. Do not pass a de-duplicated list of acceptable
    answers here -- use ``exact`` for that.

    ``leave_one_out=True`` reproduces the official server: average of
    ``min(1, matches among the other n-1 answers / 3)`` over each held-out
    answer (needs at least 4 references, else the plain rule is used).
    """
    refs = [normalize_answer(a) for a in _as_list(answers)]
    if not refs:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    p = normalize_answer(pred)
    matches = sum(r == p for r in refs)
    if leave_one_out and len(refs) >= 4:
        per_heldout = [min(1.0, (matches - (r == p)) / 3.0) for r in refs]
        return sum(per_heldout) / len(refs)
    return min(1.0, matches / min(3, len(refs)))


# --------------------------------------------------------------------------
# Yes / no
# --------------------------------------------------------------------------

_YES_FIRST = frozenset({"yes", "yeah", "yep", "yup", "true", "correct"})
_NO_FIRST = frozenset({"no", "nope", "false", "incorrect"})
_UNSURE = re.compile(
    r"\b(not sure|unsure|unclear|not clear|(cannot|can't|can not) (be )?(determine|tell|say)"
    r"|(don't|do not) know|impossible to (tell|say|determine))\b"
)
_NEGATIVE = re.compile(
    r"^not\b|\bthere (is|are|was|were) (not|none)\b"
    r"|\b(is|are|was|were|does|do|did|can) not\b"
    r"|\b(isn't|aren't|wasn't|weren't|doesn't|don't|didn't|cannot|can't)\b"
)
_POSITIVE = re.compile(
    r"\bthere (is|are|was|were) (a|an|one|two|some|several|many|\d+)\b"
    r"|\b(is|are) (visible|present|shown)\b"
)


def parse_yes_no(pred: str) -> str | None:
    """"yes"/"no" from a free-text answer, or None when it is not clear.

    Order: first word (yes/yeah/true/... or no/nope/false/...); otherwise a
    lone "yes" or "no" word anywhere; otherwise hedges ("not sure") give None,
    negations ("there is not", "doesn't") give "no" and plain existence
    ("there is a", "is visible") gives "yes".
    """
    text = _clean_unicode(pred).lower().strip()
    words = re.findall(r"[a-z']+", text)
    if not words:
        return None
    if words[0] in _YES_FIRST:
        return "yes"
    if words[0] in _NO_FIRST:
        return "no"
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    if has_yes:  # both words present: contradictory
        return None
    if _UNSURE.search(text):
        return None
    if _NEGATIVE.search(text):
        return "no"
    if _POSITIVE.search(text):
        return "yes"
    return None


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def _binary_scores(parsed: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Confusion-matrix scores; ``parsed`` may hold None (unparsed)."""
    tp = fp = tn = fn = unparsed = 0
    for p, y in zip(parsed, labels, strict=True):
        if p is None:
            unparsed += 1
        if y == "yes":
            if p == "yes":
                tp += 1
            else:
                fn += 1  # an unparsed answer to a "yes" question is a miss
        else:
            if p == "yes":
                fp += 1
            elif p == "no":
                tn += 1
    n = len(labels)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "accuracy": _safe_div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "yes_ratio": _safe_div(tp + fp, n),
        "unparsed": unparsed,
        "n": n,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def _yes_no_label(ref: str) -> str:
    label = parse_yes_no(ref)
    if label is None:
        raise ValueError(f"reference {ref!r} is not a yes/no answer")
    return label


def yes_no_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """POPE-style scores with "yes" as the positive class.

    Returns accuracy, precision, recall, f1, yes_ratio (share of predictions
    parsed as yes), unparsed (count), n and the confusion counts tp/fp/tn/fn.
    An unparsed prediction is always wrong for accuracy; for precision and
    recall it is a false negative on a "yes" question and nothing on a "no"
    question (it did not claim the object exists).
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    return _binary_scores([parse_yes_no(p) for p in preds], [_yes_no_label(r) for r in refs])


# --------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------

# "B", "b", "B.", "(B)", "[b]", "**B**", "B)"
_BARE_LETTER = re.compile(r"[\s(\[*\"'`]*([A-Za-z])[\s)\].:,*\"'`]*")
# Leading "B." / "B)" / "B:" / "(B)" / "(b)" followed by option text.
_LEADING_LETTER = re.compile(r"^\**(?:([A-Z])[.):]|[(\[]([A-Za-z])[)\]])")
# Leading bare capital then a word: "B because ...", "A is right" (not "A dog").
_LEADING_CAPITAL = re.compile(r"^([A-Z])\s+(\S+)")
_ANSWER_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?i:\s+(?:is|would be|should be|will be))?"
    r"\s*[:\-]?\s*(?i:option\s+|choice\s+)?[(\[*]*([A-Za-z])(?![A-Za-z'])\s*([^\s]?)"
)
_PAREN_LETTER = re.compile(r"[(\[]([A-Z])[)\]]")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _letters(choices: Sequence[str] | None) -> str:
    n = len(choices) if choices else 26
    return string.ascii_uppercase[: min(n, 26)]


def _unique(found: Sequence[str], allowed: str) -> str | None:
    hits = {f.upper() for f in found if f and f.upper() in allowed}
    return hits.pop() if len(hits) == 1 else None


def _match_option_text(text: str, choices: Sequence[str]) -> str | None:
    pred = normalize_answer(text)
    if not pred:
        return None
    options = [normalize_answer(c) for c in choices]
    exact = [i for i, o in enumerate(options) if o and o == pred]
    if len(exact) == 1:
        return string.ascii_uppercase[exact[0]]
    if exact:
        return None  # duplicated option texts: ambiguous
    contained = [i for i, o in enumerate(options) if o and f" {o} " in f" {pred} "]
    if len(contained) == 1:
        return string.ascii_uppercase[contained[0]]
    if contained:
        # "red circle" mentions options "red" and "red circle": keep the
        # longest only if every other hit is part of it.
        best = max(contained, key=lambda i: len(options[i]))
        if all(f" {options[i]} " in f" {options[best]} " for i in contained if i != best):
            return string.ascii_uppercase[best]
    return None


def parse_choice(pred: str, choices: Sequence[str] | None = None) -> str | None:
    """Option letter ("A", "B", ...) named by a free-text answer, or None.

    Tried in order: the whole answer is a letter ("B", "b.", "(B)"); the answer
    starts with a marked letter ("B. red", "(B) red", "B because"); a phrase
    ("The answer is B", "Answer: (C)", "option d."); a single parenthesised
    capital anywhere; the option text itself (exact after normalisation, then
    as a whole-word part of the answer); a single standalone capital letter.
    Letters outside the option count are ignored. ``choices=None`` allows
    A-Z and skips option-text matching.
    """
    text = _clean_unicode(pred).strip()
    if not text:
        return None
    allowed = _letters(choices)

    m = _BARE_LETTER.fullmatch(text)
    if m:
        return _unique([m.group(1)], allowed)

    m = _LEADING_LETTER.match(text)
    if m:
        letter = _unique([m.group(1) or m.group(2)], allowed)
        if letter:
            return letter
    m = _LEADING_CAPITAL.match(text)
    # "A dog" / "I think": an article or pronoun, not a letter.
    if m and not (m.group(1) in "AI" and m.group(2)[0].islower() and m.group(2) != "is"):
        letter = _unique([m.group(1)], allowed)
        if letter:
            return letter

    for m in _ANSWER_PHRASE.finditer(text):
        letter, after = m.group(1), m.group(2)
        # Lower case only counts when nothing word-like follows
        # ("answer is b." yes, "answer is a red circle" no).
        if letter.isupper() or not after or not after.isalnum():
            found = _unique([letter], allowed)
            if found:
                return found

    found = _unique(_PAREN_LETTER.findall(text), allowed)
    if found:
        return found

    if choices:
        found = _match_option_text(text, choices)
        if found:
            return found

    lone = [
        m.group(1)
        for m in _LONE_CAPITAL.finditer(text)
        if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end():]))
    ]
    return _unique(lone, allowed)


def _reference_letters(answers: Sequence[str], choices: Sequence[str] | None) -> set[str]:
    letters = {parse_choice(a, choices) for a in answers}
    letters.discard(None)
    if not letters:
        raise ValueError(f"no reference among {list(answers)!r} names an option of {choices!r}")
    return letters  # type: ignore[return-value]


def multiple_choice_score(
    pred: str, answers: str | Sequence[str], choices: Sequence[str] | None
) -> float:
    """1.0 if the parsed option letter matches a reference.

    References may be letters ("B") or option texts; unparsed predictions
    score 0.
    """
    parsed = parse_choice(pred, choices)
    return float(parsed is not None and parsed in _reference_letters(_as_list(answers), choices))


def multiple_choice_accuracy(
    preds: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    choices: Sequence[Sequence[str] | None],
) -> float:
    """Mean :func:`multiple_choice_score` over parallel lists."""
    if not (len(preds) == len(answers) == len(choices)):
        raise ValueError("preds, answers and choices must have the same length")
    if not preds:
        return 0.0
    return sum(map(multiple_choice_score, preds, answers, choices)) / len(preds)


# --------------------------------------------------------------------------
# Captions / long answers
# --------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, references: str | Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure (LCS based), best over references.

    ``F = (1 + beta^2) P R / (R + beta^2 P)`` with P = LCS/|pred| and
    R = LCS/|ref|. beta=1 is the plain harmonic mean (COCO uses 1.2).
    """
    cand = _tokens(pred)
    best = 0.0
    for ref in _as_list(references):
        r = _tokens(ref)
        if not cand or not r:
            best = max(best, float(not cand and not r))
            continue
        lcs = _lcs_length(cand, r)
        if lcs == 0:
            continue
        p, rec = lcs / len(cand), lcs / len(r)
        best = max(best, (1 + beta**2) * p * rec / (rec + beta**2 * p))
    return best


def token_f1(pred: str, references: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 (SQuAD style), best over references."""
    cand = Counter(_tokens(pred))
    best = 0.0
    for ref in _as_list(references):
        r = Counter(_tokens(ref))
        if not cand or not r:
            best = max(best, float(not cand and not r))
            continue
        common = sum((cand & r).values())
        if common:
            p, rec = common / sum(cand.values()), common / sum(r.values())
            best = max(best, 2 * p * rec / (p + rec))
    return best


def bleu4(pred: str, references: str | Sequence[str]) -> float:
    """Sentence BLEU-4 with add-one smoothing on 2- to 4-gram precisions.

    Clipped counts against all references, brevity penalty from the closest
    reference length (shorter on ties). Unigram precision is unsmoothed, so
    an answer sharing no word with any reference scores 0.
    """
    cand = _tokens(pred)
    refs = [_tokens(r) for r in _as_list(references)]
    if not cand or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, 5):
        grams = Counter(tuple(cand[i : i + n]) for i in range(len(cand) - n + 1))
        max_ref: Counter[tuple[str, ...]] = Counter()
        for r in refs:
            max_ref |= Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
        clipped = sum(min(c, max_ref[g]) for g, c in grams.items())
        total = sum(grams.values())
        if n == 1:
            if clipped == 0:
                return 0.0
            log_p += math.log(clipped / total)
        else:
            log_p += math.log((clipped + 1) / (total + 1))
    c = len(cand)
    r = min((len(x) for x in refs), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p / 4)


def caption_scores(pred: str, references: str | Sequence[str]) -> dict[str, float]:
    """``{"rouge_l", "token_f1", "bleu4"}`` on normalised tokens."""
    return {
        "rouge_l": rouge_l(pred, references),
        "token_f1": token_f1(pred, references),
        "bleu4": bleu4(pred, references),
    }


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


def score_record(record: Mapping[str, Any], prediction: str) -> dict[str, Any]:
    """Score one record; returns a JSON-ready row.

    Keys: id, family, metric, subset (or None), prediction, normalized,
    reference (first answer), score, correct (bool; None for captions) and,
    for yesno/mc, ``parsed`` (the yes/no or letter read from the prediction,
    None if unreadable) and ``label`` (the reference yes/no or letter).
    """
    metric = record.get("metric")
    answers = _as_list(record.get("answers") or [])
    if not answers:
        raise ValueError(f"record {record.get('id')!r} has no answers")
    row: dict[str, Any] = {
        "id": str(record.get("id")),
        "family": record.get("family"),
        "metric": metric,
        "subset": record.get("subset"),
        "prediction": prediction,
        "normalized": normalize_answer(prediction),
        "reference": answers[0],
    }
    if metric == "exact":
        score = exact_match(prediction, answers)
    elif metric == "vqa":
        score = vqa_accuracy(prediction, answers)
    elif metric == "yesno":
        row["parsed"] = parse_yes_no(prediction)
        row["label"] = _yes_no_label(answers[0])
        score = float(row["parsed"] == row["label"])
    elif metric == "mc":
        choices = record.get("choices")
        row["parsed"] = parse_choice(prediction, choices)
        labels = _reference_letters(answers, choices)
        row["label"] = sorted(labels)[0] if len(labels) == 1 else sorted(labels)
        score = float(row["parsed"] in labels)
    elif metric == "caption":
        row.update(caption_scores(prediction, answers))
        score = row["rouge_l"]
    else:
        raise ValueError(f"record {row['id']!r}: unknown metric {metric!r}; expected one of {METRICS}")
    row["score"] = score
    row["correct"] = None if metric == "caption" else score >= 1.0
    return row


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _acc_plus(rows: Sequence[Mapping[str, Any]], images: Sequence[Any]) -> float | None:
    """MME "accuracy+": share of images whose questions are all right."""
    if not rows or any(img is None for img in images):
        return None
    per_image: dict[str, bool] = {}
    for row, img in zip(rows, images):
        key = repr(img)
        per_image[key] = per_image.get(key, True) and bool(row["correct"])
    return _mean([float(v) for v in per_image.values()])


def _group_summary(metric: str, rows: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """Score and extras for one family (or one subset of it)."""
    out: dict[str, Any] = {"metric": metric, "n": len(rows)}
    if metric == "yesno":
        yn = _binary_scores([r["parsed"] for r in rows], [r["label"] for r in rows])
        out["score"] = yn["accuracy"]
        for key in ("f1", "precision", "recall", "yes_ratio", "unparsed", "tp", "fp", "tn", "fn"):
            out[key] = yn[key]
        acc_plus = _acc_plus(rows, images)
        if acc_plus is not None:
            out["acc_plus"] = acc_plus
    else:
        out["score"] = _mean([r["score"] for r in rows])
        if metric == "mc":
            out["unparsed"] = sum(r["parsed"] is None for r in rows)
        elif metric == "caption":
            out["token_f1"] = _mean([r["token_f1"] for r in rows])
            out["bleu4"] = _mean([r["bleu4"] for r in rows])
    return out


def score_records(
    records: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, str],
    *,
    missing_as_wrong: bool = False,
) -> dict[str, Any]:
    """Score predictions (keyed by ``str(record["id"])``) family by family.

    Returns::

        {"families": {family: {"metric", "score", "n", "missing", ...extras,
                               "subsets": {subset: {...same keys...}}}},
         "average": mean of family scores (macro),
         "n": records scored, "missing": [ids without prediction],
         "records": [score_record rows, in input order]}

    Family score: exact/vqa/mc mean accuracy; yesno accuracy (with f1,
    precision, recall, yes_ratio, unparsed, tp/fp/tn/fn and, when records
    carry "image", MME-style acc_plus); caption mean ROUGE-L F (with
    token_f1 and bleu4). ``subsets`` appears when records carry "subset".

    Records without a prediction are listed in ``missing`` and left out of
    the scores, unless ``missing_as_wrong`` scores them as an empty answer.
    Each family must use one metric; record ids must be unique.
    """
    seen: set[str] = set()
    family_metric: dict[str, str] = {}
    grouped: dict[str, list[tuple[dict[str, Any], Any]]] = defaultdict(list)
    all_rows: list[dict[str, Any]] = []
    missing: list[str] = []
    missing_by_family: Counter[str] = Counter()

    for record in records:
        rid = str(record.get("id"))
        if rid in seen:
            raise ValueError(f"duplicate record id {rid!r}")
        seen.add(rid)
        family = str(record.get("family") or "default")
        metric = record.get("metric")
        if family_metric.setdefault(family, metric) != metric:
            raise ValueError(
                f"family {family!r} mixes metrics {family_metric[family]!r} and {metric!r}"
            )
        pred = predictions.get(rid)
        if pred is None:
            missing.append(rid)
            missing_by_family[family] += 1
            if not missing_as_wrong:
                continue
            pred = ""
        row = score_record(record, pred)
        row["family"] = family
        all_rows.append(row)
        grouped[family].append((row, record.get("image")))

    families: dict[str, dict[str, Any]] = {}
    for family, metric in family_metric.items():
        pairs = grouped.get(family, [])
        rows = [r for r, _ in pairs]
        summary = _group_summary(metric, rows, [img for _, img in pairs])
        summary["missing"] = missing_by_family[family]
        subsets: dict[str, list[tuple[dict[str, Any], Any]]] = defaultdict(list)
        for row, img in pairs:
            if row["subset"] is not None:
                subsets[str(row["subset"])].append((row, img))
        if subsets:
            summary["subsets"] = {
                name: _group_summary(metric, [r for r, _ in sp], [i for _, i in sp])
                for name, sp in subsets.items()
            }
        families[family] = summary

    scored = [f["score"] for f in families.values() if f["n"] > 0]
    result = {
        "families": families,
        "average": _mean(scored),
        "n": len(all_rows),
        "missing": missing,
        "records": all_rows,
    }
    by_distance = recall_by_distance(records, all_rows)  # recall records that carry a distance
    if by_distance:
        result["recall_by_distance"] = by_distance
    return result
