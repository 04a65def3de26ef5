"""Which OCR strings does a teacher misread? Held-out words (never in training) against seen ones, by text type.

    python benchmarks/probes/ocr_errors.py matvlm/assets/teacher --data runs/world [--out ocr_errors.json]

Reads the held-out OCR records (test.json), answers them greedily (matvlm.eval.runner.generate_answers), scores
them with the evaluator's VQA accuracy and prints it by text type (word, phrase, number, code) and by whether the
string holds one of the world's held-out OCR words (world.json), plus misread examples. Session 16's teacher read
every seen word and none of the held-out ones, answering a seen word of similar shape.
"""

from __future__ import annotations

import json
from collections import defaultdict

from matvlm.eval.metrics import vqa_accuracy
from teacher_answers import answer_family, probe_args, report


def summarise(records: list[dict], predictions: dict[str, str], heldout_words: set[str], examples: int = 20) -> dict:
    groups: dict[str, list[float]] = defaultdict(list)
    misread = []
    for r in records:
        string, answer = r["scene"]["text"]["string"], predictions[r["id"]]
        score = vqa_accuracy(answer, r["answers"])
        words = "held-out word" if heldout_words & set(string.split()) else "seen words only"
        for key in ("all", words, f"{words}, {r['text_type']}"):
            groups[key].append(score)
        if score < 1 and len(misread) < examples:
            misread.append({"id": r["id"], "string": string, "answer": answer, "group": words})
    return {
        "n": len(records),
        "accuracy": {k: {"score": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())},
        "misread": misread,
    }


def main() -> None:
    args = probe_args(__doc__)
    records, predictions = answer_family(args.teacher, args.data, "ocr", args.batch_size)
    heldout_words = set(json.loads((args.data / "world.json").read_text())["heldout"]["ocr_words"])
    result = {"teacher": str(args.teacher), **summarise(records, predictions, heldout_words)}
    report(result, args.out)


if __name__ == "__main__":
    main()
