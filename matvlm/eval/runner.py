"""Batched greedy evaluation of a VLM (teacher or hybrid) on LLaVA-format test records."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.llava import BadRecordError, collate, generation_inputs
from .metrics import score_records
from .recall import recall_by_distance

# Written next to a model by our own commands: what a model directory cannot say by itself.
MODEL_INFO_FILE = "matvlm.json"


@dataclass
class GenerationRun:
    predictions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def first_per_family(records: list[dict], n: int) -> list[dict]:
    """The first n records of each family (records without one count as family None), in their order."""
    seen: dict = {}
    kept = []
    for record in records:
        family = record.get("family")
        seen[family] = seen.get(family, 0) + 1
        if seen[family] <= n:
            kept.append(record)
    return kept


def read_model_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def guess_template(tokenizer) -> str:
    """Template from the tokenizer's end token when the model directory does not name one."""
    return "phi" if tokenizer.eos_token == "<|endoftext|>" else "vicuna_v1"


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    image_processor,
    records: Sequence[dict],
    image_folders: Sequence[str | Path],
    template: str,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    skip_bad: bool = False,
    progress: bool = True,
    source: str | Path | None = None,
) -> GenerationRun:
    """Greedy answers for the last turn of each record, in left-padded batches of similar length.

    A bad record (missing or corrupt image, malformed conversation) stops the run with its id, or is
    counted in `problems` and skipped when `skip_bad`.
    """
    device = next(model.parameters()).device
    num_image_tokens = model.config.image_seq_length
    run = GenerationRun()
    items = []
    for record in records:
        try:
            items.append(
                generation_inputs(
                    record, tokenizer, template, num_image_tokens, image_folders, image_processor, source=source
                )
            )
        except BadRecordError as err:
            if not skip_bad:
                raise
            run.problems.append(str(err))
    items.sort(key=lambda item: len(item["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    bar = tqdm(total=len(items), desc="generating", disable=not progress, unit="rec")
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_token_id=pad_id, padding_side="left")
        # transformers runs the vision tower even on pixel_values=None: pass images only when there are some.
        images = {}
        if batch["pixel_values"] is not None:
            images["pixel_values"] = batch["pixel_values"].to(device, dtype=model.dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            **images,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.seconds += time.perf_counter() - began
        new = out[:, batch["input_ids"].shape[1] :].cpu()
        for row, record_id in enumerate(batch["ids"]):
            tokens = new[row].tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            run.new_tokens += len(tokens)
            run.predictions[str(record_id)] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        bar.update(len(batch["ids"]))
    bar.close()
    return run


def evaluate(model, tokenizer, image_processor, records: Sequence[dict], image_folders: Sequence[str | Path],
             template: str, **generate_kwargs) -> dict:
    """Generate (see `generate_answers` for the options) and score; returns score_records' result plus
    throughput and the bad records that were skipped."""
    run = generate_answers(model, tokenizer, image_processor, records, image_folders, template, **generate_kwargs)
    scored_records = [r for r in records if str(r["id"]) in run.predictions]
    results = score_records(scored_records, run.predictions)
    results["tokens_per_second"] = run.tokens_per_second
    results["generated_tokens"] = run.new_tokens
    results["generation_seconds"] = run.seconds
    results["bad_records"] = run.problems
    by_distance = recall_by_distance(scored_records, results["records"])
    if by_distance:
        results["recall_by_distance"] = by_distance
    return results
