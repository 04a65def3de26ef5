"""Does a teacher copy? Teacher-forced accuracy on plain-text records it may never have scored:

- repeat: the training-only "repeat" family (8-24 world words said twice; the second copy is the target), drawn
  from record numbers far beyond any training run's (--start);
- lookup: the held-out recall records' facts as bare world words ("orange door 36 orange safe 14"), then one
  key again ("orange door") and its number as the target: recall in the repeat family's form, where plain
  induction (find the key earlier, copy what followed) answers it.

    python benchmarks/probes/repeat_copy.py matvlm/assets/teacher --data runs/world [--n 300] [--out F.json]

Prints, for each: accuracy of every target token, whole-target exact match, and for lookup the chance of a random
stated number. A model that learned the repeat family copies (repeat near 1.0); one that also matches keys to
values answers lookup above chance.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from matvlm.data.generated import GeneratedRecords
from teacher_answers import report

KEY_FACT = re.compile(r"The key for the (\w+ \w+) is (\d+)\.")

# (prompt, target, chance of a random stated number); a repeat record has no stated numbers to pick among.
Pair = tuple[str, str, float]


def text_pairs_repeat(data: Path, n: int, start: int) -> list[Pair]:
    records = GeneratedRecords.from_world(data, n * 16, train_only=["repeat"], start=start)
    picked = [i for i in range(len(records)) if records.family(i) == "repeat"][:n]
    return [(records[i]["prompt"], records[i]["completion"], 0.0) for i in picked]


def text_pairs_lookup(data: Path, n: int) -> list[Pair]:
    pairs = []
    for r in json.loads((data / "test.json").read_text()):
        if r.get("family") != "recall":
            continue
        facts = dict(KEY_FACT.findall(r["conversations"][0]["value"]))
        key = next(k for k in facts if k in r["conversations"][-2]["value"])
        if facts[key] != r["answers"][0]:
            raise ValueError(f"{r['id']}: the asked key {key!r} is {facts[key]}, the record's answer {r['answers'][0]}")
        text = " ".join(f"{k} {v}" for k, v in facts.items())
        pairs.append((f" {text} {key}", f" {facts[key]}", 1 / len(facts)))
    return pairs[:n]


@torch.no_grad()
def score(model, tokenizer, pairs: list[Pair]) -> dict:
    tokens = right_tokens = exact = 0
    for prompt, completion, _ in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1: -1]
        hits = logits.argmax(-1) == torch.tensor(c)
        tokens += len(c)
        right_tokens += int(hits.sum())
        exact += bool(hits.all())
    return {"n": len(pairs), "token_accuracy": right_tokens / tokens, "exact": exact / len(pairs),
            "chance": sum(p[2] for p in pairs) / len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--data", type=Path, default=Path("runs/world"))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--start", type=int, default=50_000_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = LlavaForConditionalGeneration.from_pretrained(args.teacher, dtype=torch.float32).eval()
    result = {"teacher": str(args.teacher),
              "repeat": score(model, tokenizer, text_pairs_repeat(args.data, args.n, args.start)),
              "lookup": score(model, tokenizer, text_pairs_lookup(args.data, args.n))}
    report(result, args.out)


if __name__ == "__main__":
    main()
