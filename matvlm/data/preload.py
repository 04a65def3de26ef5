"""Keep every item of a data set in memory, computed once by parallel workers.

Small worlds are read many times over (a teacher sees each synthetic record ~15 times): tokenising and
decoding them once moves the input pipeline off the critical path. Items are identical to the wrapped
data set's, so a run gives the same numbers with or without it. `pixel_dtype=torch.bfloat16` keeps pixels at
half the memory and half the host copies; use it only where the model casts them to bf16 anyway (a bf16
autocast run, whose patch convolution rounds fp32 pixels to bf16 itself).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _to_numpy(items: list[dict], pixel_dtype: torch.dtype | None = None) -> list[dict]:
    # Workers hand back numpy arrays, pickled by value: thousands of shared-memory tensors would each
    # take a file descriptor and exhaust the limit. Pixels are cast here, in the single-threaded workers:
    # in the main process every image's cast fanned out over all cores' intra-op threads, and four runs on
    # one host preloaded 40x slower. numpy has no bf16, so the cast pixels travel as raw bits.
    out = []
    for item in items:
        item = dict(item)
        if pixel_dtype is not None and item.get("pixel_values") is not None:
            item["pixel_values"] = item["pixel_values"].to(pixel_dtype).view(_BITS[pixel_dtype.itemsize])
        out.append({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in item.items()})
    return out


class PreloadedDataset(Dataset):
    def __init__(self, dataset: Dataset, workers: int = 8, progress: bool = True, pixel_dtype: torch.dtype | None = None):
        self.lengths = getattr(dataset, "lengths", None)
        collate = functools.partial(_to_numpy, pixel_dtype=pixel_dtype)
        loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=workers, collate_fn=collate)
        self.items: list[dict[str, Any]] = []
        for chunk in tqdm(loader, desc="preloading", disable=not progress, unit_scale=256):
            for item in chunk:
                item = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                        for k, v in item.items()}
                item["input_ids"] = item["input_ids"].to(torch.int32)  # halves the memory; widened on access
                item["labels"] = item["labels"].to(torch.int32)
                if pixel_dtype is not None and item.get("pixel_values") is not None:
                    item["pixel_values"] = item["pixel_values"].view(pixel_dtype)
                self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        item["input_ids"] = item["input_ids"].long()
        item["labels"] = item["labels"].long()
        return item
