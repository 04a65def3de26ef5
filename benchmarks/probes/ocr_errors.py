"""Which OCR strings does a teacher misread? Held-out words (never in training) against seen ones, by text type.

    python benchmarks/probes/ocr_errors.py matvlm/assets/teacher --data runs/world [--out ocr_errors.json]

Reads the held-out OCR records (test.json), answers them greedily (matvlm.eval.runner.generate_answers), scores
them with the evaluator's VQA accuracy and prints it by text type (word, phrase, number, code) and by whether the
string holds one of the world's held-out OCR words (world.json), plus misread examples. Session 16's teacher read
every seen word but a third of the held-out ones, often as a seen word of similar shape.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from matvlm.eval.metrics import vqa_accuracy
from matvlm.eval.runner import generate_answers, read_model_info


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--data", type=Path, default=Path("runs/world"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = [r for r in json.loads((args.data / "test.json").read_text()) if r.get("family") == "ocr"]
    heldout_words = set(json.loads((args.data / "world.json").read_text())["heldout"]["ocr_words"])
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = LlavaForConditionalGeneration.from_pretrained(args.teacher, dtype=torch.float32)
    template = read_model_info(args.teacher).get("template", "phi")
    run = generate_answers(model, tokenizer, AutoImageProcessor.from_pretrained(args.teacher), records,
                           [args.data / "images"], template, batch_size=args.batch_size)
    result = {"teacher": str(args.teacher), **summarise(records, run.predictions, heldout_words)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
