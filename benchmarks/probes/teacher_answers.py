"""Shared by the teacher probes: a teacher's greedy answers to one family's held-out records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from matvlm.eval.runner import generate_answers, read_model_info


def answer_family(teacher: Path, data: Path, family: str, batch_size: int = 32) -> tuple[list[dict], dict[str, str]]:
    """-> (the family's records in DATA/test.json, {record id: answer})."""
    records = [r for r in json.loads((data / "test.json").read_text()) if r.get("family") == family]
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = LlavaForConditionalGeneration.from_pretrained(teacher, dtype=torch.float32)
    template = read_model_info(teacher).get("template", "phi")
    run = generate_answers(model, tokenizer, AutoImageProcessor.from_pretrained(teacher), records,
                           [data / "images"], template, batch_size=batch_size)
    return records, run.predictions


def probe_args(doc: str) -> argparse.Namespace:
    """The probes' command line: TEACHER [--data DIR] [--batch-size B] [--out FILE]."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--data", type=Path, default=Path("runs/world"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def report(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")
