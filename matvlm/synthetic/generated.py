"""The synthetic world's training records made on demand, in the DataLoader's workers, instead of read from disk.

A teacher that reads the same 100k records dozens of times learns them by heart (81% on
training records against 62% held out, measured on the world). Records are deterministic in (seed, split, index), so any number of them
can be made on the fly: record i here is the record that `matvlm data synth --train N` writes as i (same seed
and image size), and its image is the one that PNG holds. Nothing is written, and nothing is kept in memory but
one word count per record (for length-grouped batches).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from matvlm.data.llava import SupervisedDataset, pixel_values_of, record_words
from matvlm.synthetic.scene import render
from matvlm.synthetic.world import FAMILIES, GENERATOR_VERSION, TEXT_FAMILIES, TRAIN_ONLY_FAMILIES, World, make_record

_BLOCK = 4096  # records per word-count job


@functools.lru_cache(maxsize=4)
def _world(seed: int, image_size: int) -> World:
    return World.make(seed, image_size)


def _block_words(job: tuple) -> list[int]:
    seed, image_size, split, families, start, stop = job
    world = _world(seed, image_size)
    return [record_words(make_record(world, split, i, families[i % len(families)], i // len(families)))
            for i in range(start, stop)]


class GeneratedRecords(Sequence):
    """Records start .. start + n - 1 of a world's split (the first n by default), each made when it is read:
    item i is the record `data synth` would write as number start + i."""

    def __init__(self, seed: int, image_size: int, n: int, split: str = "train", families: list[str] | None = None,
                 workers: int = 1, progress: bool = False, start: int = 0):
        self.families = list(FAMILIES) if families is None else list(families)
        unknown = [f for f in self.families if f not in FAMILIES and f not in TRAIN_ONLY_FAMILIES]
        if unknown or not self.families or n < 1 or start < 0:
            raise ValueError(f"generated records: need n >= 1 (got {n}), start >= 0 (got {start}) and known "
                             f"families (unknown: {unknown})")
        self.seed, self.image_size, self.n, self.split, self.start = seed, image_size, n, split, start
        self.workers, self.progress = workers, progress
        self._words: list[int] | None = None

    @classmethod
    def from_world(cls, world_dir: str | Path, n: int, train_only: Sequence[str] = (), **kwargs) -> GeneratedRecords:
        """Records of the world described by WORLD_DIR/world.json (written by `matvlm data synth`), its families
        in turn followed by the `train_only` ones (TRAIN_ONLY_FAMILIES, e.g. copy)."""
        path = Path(world_dir) / "world.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: generated records need the world's seed and image size "
                                    "(a folder written by `matvlm data synth`)")
        info = json.loads(path.read_text())
        if info.get("generator_version") != GENERATOR_VERSION:
            raise ValueError(f"{path} was written by generator {info.get('generator_version')}, this is "
                             f"{GENERATOR_VERSION}: generated records would not match its test split's world")
        if bad := [f for f in train_only if f not in TRAIN_ONLY_FAMILIES]:
            raise ValueError(f"train-only families {bad} unknown; choose from {list(TRAIN_ONLY_FAMILIES)}")
        return cls(info["seed"], info["image_size"], n, families=list(info["families"]) + list(train_only), **kwargs)

    def __len__(self) -> int:
        return self.n

    def family(self, index: int) -> str:
        return self.families[(self.start + index) % len(self.families)]

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} of {self.n}")
        number = self.start + index
        family = self.family(index)
        record = make_record(_world(self.seed, self.image_size), self.split, number, family, number // len(self.families))
        return record

    def has_image(self, index: int) -> bool:
        family = self.family(index)
        return family not in TEXT_FAMILIES

    def size_blocks(self, part: int = 0, parts: int = 1) -> list[list[int]]:
        """Word counts of blocks part, part + parts, ... of `_BLOCK` records: one process's share of the sizing
        (~0.3 ms a record on one core), made in `workers` processes."""
        end = self.start + self.n
        jobs = [(self.seed, self.image_size, self.split, self.families, a, min(a + _BLOCK, end))
                for a in range(self.start + part * _BLOCK, end, parts * _BLOCK)]
        bar = tqdm(total=sum(b - a for *_, a, b in jobs), desc="sizing generated records", disable=not self.progress,
                   unit="rec")
        blocks: list[list[int]] = []
        with ProcessPoolExecutor(self.workers) if self.workers > 1 else contextlib.nullcontext() as pool:
            for block in (pool.map if pool else map)(_block_words, jobs):
                blocks.append(block)
                bar.update(len(block))
        bar.close()
        return blocks

    def join_blocks(self, shares: list[list[list[int]]]) -> None:
        """Set every record's word count from all processes' `size_blocks(part, len(shares))`, in part order."""
        blocks, parts = -(-self.n // _BLOCK), len(shares)
        words = [w for b in range(blocks) if b // parts < len(shares[b % parts]) for w in shares[b % parts][b // parts]]
        if len(words) != self.n:
            raise ValueError(f"sizing shares hold {len(words)} word counts for {self.n} records")
        self._words = words

    @property
    def words(self) -> list[int]:
        """Every record's word count (made once, here, unless `join_blocks` set them)."""
        if self._words is None:
            self.join_blocks([self.size_blocks()])
        return self._words


class GeneratedDataset(SupervisedDataset):
    """`SupervisedDataset` over `GeneratedRecords`: images are drawn from each record's scene, not read."""

    records: GeneratedRecords

    def __init__(self, records: GeneratedRecords, tokenizer, image_processor, template, num_image_tokens: int,
                 max_length: int, pixel_dtype: torch.dtype | None = None, **kwargs):
        self.pixel_dtype = pixel_dtype  # e.g. bf16 for a bf16 autocast run: cast here, in the loader's workers
        super().__init__(records, [], tokenizer, image_processor, template, num_image_tokens=num_image_tokens,
                         max_length=max_length, source=f"generated {records.split} records (seed {records.seed})",
                         **kwargs)

    def _load_pixels(self, record, index):
        pixels = pixel_values_of(self.image_processor, render(record["scene"]))
        return pixels if self.pixel_dtype is None else pixels.to(self.pixel_dtype)

    @property
    def lengths(self) -> list[int]:
        if self._lengths is None:  # without making the records
            self._lengths = [self.length_estimate(w, self.records.has_image(i))
                             for i, w in enumerate(self.records.words)]
        return self._lengths
