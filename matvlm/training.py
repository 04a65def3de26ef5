"""Pieces shared by the teacher trainer and the distillation trainer.

Learning-rate schedules, AdamW parameter groups, a resumable batch order and atomic checkpoints. A run
stopped and resumed from its last checkpoint continues with the same batches, the same optimizer state
and the same random state as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Sampler

from matvlm.data.llava import LengthGroupedSampler

CHECKPOINT_PREFIX = "checkpoint-"
# Parameters that never get weight decay besides 1-D tensors (Mamba-2 convention).
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def lr_factor(step: int, total: int, warmup: float = 0.1, decay: float = 0.1, shape: str = "wsd") -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`.

    wsd: linear warmup over the first `warmup` fraction, constant, then linear decay to 0 over the last
    `decay` fraction. cosine: warmup, then cosine decay to 10% of peak. constant: warmup, then the peak.
    """
    if shape not in ("wsd", "cosine", "constant"):
        raise ValueError(f"unknown schedule {shape!r}; choose wsd, cosine or constant")
    warm_steps = max(1, int(round(warmup * total)))
    if step < warm_steps:
        return (step + 1) / warm_steps
    if shape == "constant":
        return 1.0
    if shape == "wsd":
        decay_steps = max(1, int(round(decay * total)))
        start = total - decay_steps
        return 1.0 if step < start else max(0.0, (total - step) / decay_steps)
    progress = min(1.0, (step - warm_steps) / max(1, total - warm_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (1-D, A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EpochOrder:
    """Deterministic batch order over epochs that can resume from any batch.

    Batch k of a run is always the same list of indices for the same (lengths, batch_size, seed), so a
    resumed run sees exactly the batches an uninterrupted one would. Within an epoch the order is the
    length-grouped shuffle of `LengthGroupedSampler` (similar lengths share a batch: less padding), or with
    `grouped=False` a plain shuffle (every batch a random draw: records of different lengths, and so of different
    kinds, share batches).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, grouped: bool = True):
        if len(lengths) < batch_size:
            raise ValueError(f"{len(lengths)} records are fewer than one batch of {batch_size}")
        self.sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, mega_batch_mult=None if grouped else 1)
        self.batch_size = batch_size
        self.batches_per_epoch = len(lengths) // batch_size  # the last partial batch is dropped

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = self.sampler.indices()
        b = self.batch_size
        return [order[i * b : (i + 1) * b] for i in range(self.batches_per_epoch)]

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Yields (global batch number, indices) forever, starting at `start_batch`."""
        epoch, offset = divmod(start_batch, self.batches_per_epoch)
        while True:
            for k, batch in enumerate(self.epoch_batches(epoch)[offset:], start=offset):
                yield epoch * self.batches_per_epoch + k, batch
            epoch, offset = epoch + 1, 0


class SubsetOrder:
    """An `EpochOrder` over some of the records; yields indices into the whole data set."""

    def __init__(self, indices: list[int], lengths: list[int], batch_size: int, seed: int, grouped: bool = True):
        self.indices = list(indices)
        self.order = EpochOrder([lengths[i] for i in self.indices], batch_size, seed, grouped)
        self.batch_size = batch_size

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[int, list[int]]]:
        for number, batch in self.order.iterate(start_batch):
            yield number, [self.indices[i] for i in batch]


class StagedOrder:
    """The first `first_steps` batches from `first` (a curriculum warm-up), then `then` forever.

    Batch k is still a pure function of k, so a resumed run sees the batches an uninterrupted one would.
    """

    def __init__(self, first, first_steps: int, then):
        if first.batch_size != then.batch_size:
            raise ValueError("both stages must use the same batch size")
        self.first, self.first_steps, self.then = first, first_steps, then
        self.batch_size = then.batch_size

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[int, list[int]]]:
        if start_batch < self.first_steps:
            for number, batch in self.first.iterate(start_batch):
                if number >= self.first_steps:
                    break
                yield number, batch
        for number, batch in self.then.iterate(max(0, start_batch - self.first_steps)):
            yield number + self.first_steps, batch


class ResumableBatches(Sampler[list[int]]):
    """Batches `start` .. `stop - 1` of an `EpochOrder`; with several processes, each takes its share
    (rank k of n gets rows k, k + n, ...) of the same global batch."""

    def __init__(self, order: "EpochOrder | StagedOrder", start: int, stop: int, rank: int = 0, world_size: int = 1):
        if order.batch_size % world_size:
            raise ValueError(f"batch size {order.batch_size} is not a multiple of the {world_size} processes")
        self.order, self.start, self.stop = order, start, stop
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in self.order.iterate(self.start):
            if number >= self.stop:
                return
            yield batch[self.rank :: self.world_size]


def micro_batches(batch: dict, max_tokens: int, multiple: int = 1) -> list[dict]:
    """Split a right-padded collated batch into row chunks of at most `max_tokens` padded tokens each
    (before the rounding below).

    Each chunk is trimmed to its own longest row, rounded up to a multiple of `multiple` (at most the
    batch's width; collate with the same `pad_to_multiple_of`): fewer distinct shapes for GPU kernels to
    compile, tune and cache. Short batches stay whole; a batch of long records is split instead of
    running out of memory. Rows with images keep their own pixel_values.
    """
    return row_chunks(batch, micro_batch_bounds(batch, max_tokens), multiple)


def micro_batch_bounds(batch: dict, max_tokens: int) -> list[tuple[int, int]]:
    """(first row, end row) of each micro-batch of `micro_batches`: consecutive rows while they fit."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    bounds, start = [], 0
    while start < len(lengths):
        stop, longest = start + 1, lengths[start]
        while stop < len(lengths) and (stop + 1 - start) * max(longest, lengths[stop]) <= max_tokens:
            longest = max(longest, lengths[stop])  # a running maximum: linear in the rows, not quadratic
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def row_chunks(batch: dict, bounds: list[tuple[int, int]], multiple: int = 1) -> list[dict]:
    """Rows start..stop-1 of a collated batch for each bound, trimmed to their longest row (rounded up to
    `multiple`, at most the batch's width), with the pixel_values of those rows' images."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    # Images are stacked in row order, so rows start..stop-1 own images images_before[start]..images_before[stop]-1:
    # a slice, i.e. a view that stays in the loader's pinned memory (an index would copy it to pageable memory,
    # and its host-to-GPU copy would then block the host: session 9's profile, 6 ms a step at batch 128).
    images_before = [0, *torch.cumsum(batch["has_image"].long(), 0).tolist()]
    pixels = batch["pixel_values"]
    chunks = []
    for start, stop in bounds:
        width = min(-(-max(lengths[start:stop]) // multiple) * multiple, batch["input_ids"].shape[1])
        chunk = {k: batch[k][start:stop, :width] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        first, end = images_before[start], images_before[stop]
        chunk["pixel_values"] = pixels[first:end] if pixels is not None and end > first else None
        chunks.append(chunk)
    return chunks


def rng_state() -> dict:
    """All random states as tensors and plain Python values, so `torch.load(weights_only=True)` reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict,
    keep: int = 2,
) -> Path:
    """Write `run_dir/checkpoint-<step>` atomically: a temp folder renamed into place when complete.

    `trainable` holds the tensors that change during training (safetensors); the optimizer and RNG
    states go to a torch file; `meta` (JSON) holds the step, losses so far and anything else to resume.
    Older checkpoints beyond `keep` are removed only after the new one is in place.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_same_run(saved_config: str | Path, config, resumable: set[str]) -> None:
    """Refuse to resume a run whose options (a dataclass) changed, except those in `resumable`."""
    saved_config = Path(saved_config)
    if not saved_config.exists():
        return
    saved = json.loads(saved_config.read_text())
    now = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as saved
    changed = sorted(k for k, v in now.items() if k not in resumable and saved.get(k, v) != v)
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {saved_config.parent}: options changed ({details}); use a new --out")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (trainable tensors, optimizer+rng state, meta). Raises a clear error for a damaged checkpoint."""
    path = Path(path)
    try:
        tensors = load_file(path / "trainable.safetensors")
        state = torch.load(path / "state.pt", weights_only=True)  # a checkpoint is data, never code
        meta = json.loads((path / "meta.json").read_text())
    except Exception as err:  # noqa: BLE001 - any failure here means the checkpoint cannot be used
        raise RuntimeError(f"checkpoint {path} is damaged or incomplete ({type(err).__name__}: {err}); "
                           "delete it to resume from the one before") from err
    return tensors, state, meta


def end_process_group() -> None:
    """Close the process group of a multi-process run once every process is done (each waits for the others).
    Left open, gloo's threads outlive the interpreter and may abort the process at exit ("terminate called
    without an active exception").

    The wait goes through the group's store, not a collective: a gloo worker thread may still be releasing a
    just-finished barrier's work when the group's last reference goes, and the group's destructor, which joins
    that thread while holding the GIL, then deadlocks with it (the thread needs the GIL to free a tensor). That
    hung ~1 in 30 two-process CPU runs at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        store = dist.distributed_c10d._get_default_store()
        store.set(f"matvlm/done/{dist.get_rank()}", "1")
        store.wait([f"matvlm/done/{rank}" for rank in range(dist.get_world_size())])
        dist.destroy_process_group()
