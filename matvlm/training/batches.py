"""Which records make each batch, and how a batch is split into micro-batches.

Batch k of a run is a pure function of k (and the data set, batch size and seed), so a resumed run sees exactly
the batches an uninterrupted one would; with several processes each takes its rows of the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from matvlm.data.llava import LengthGroupedSampler


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

    def __init__(self, order: EpochOrder | StagedOrder, start: int, stop: int, rank: int = 0, world_size: int = 1):
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
    # and its host-to-GPU copy would then block the host: 6 ms a step at batch 128 on an H100).
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


def even_micro_batches(batch: dict, max_tokens: int, multiple: int, count: int) -> list[dict]:
    """`micro_batches`, with the chunks of most rows halved until there are `count` of them.

    Under FSDP2 every micro-batch runs collectives (parameter all-gathers), so all ranks must run the
    same number; splitting rows changes no loss (each is a sum divided by a global count). Every rank has
    the same number of rows, so the rank with the most chunks has at most one row per chunk.
    """
    bounds = micro_batch_bounds(batch, max_tokens)
    while len(bounds) < count:
        i = max(range(len(bounds)), key=lambda j: bounds[j][1] - bounds[j][0])
        a, b = bounds[i]
        if b - a < 2:
            raise RuntimeError(f"cannot split {bounds[-1][1]} rows into {count} micro-batches")
        bounds[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return row_chunks(batch, bounds, multiple)
