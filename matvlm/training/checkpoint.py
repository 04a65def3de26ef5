"""Checkpoints of a run: written atomically, read back exactly (trained tensors, optimizer, random state).

A checkpoint holds full tensors in one layout whatever the sharding (FSDP2 shards are gathered first), so a run
may resume under another process count or sharding. `run_dir/checkpoint-<step>/` holds:
    trainable.safetensors   the tensors that change during training
    state.pt                the optimizer state and every random generator's state
    meta.json               the step and the run's log rows so far
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from matvlm.io import atomic_directory

CHECKPOINT_PREFIX = "checkpoint-"


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


def save_checkpoint(run_dir: str | Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write `run_dir/checkpoint-<step>` atomically (a temp folder renamed into place when complete) and remove
    the checkpoints before the last `keep`, only once the new one is in place. `meta` (JSON) holds what else a
    resumed run needs (the log rows so far); the random states are taken here."""
    final = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_directory(final, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
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
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} is damaged or incomplete ({type(err).__name__}: {err}); "
                           "delete it to resume from the one before") from err
    return tensors, state, meta


def load_trained(trainable: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy a checkpoint's tensors into a model's trained tensors (`trainable`: views that share their storage,
    e.g. a state_dict), refusing a checkpoint of other tensors."""
    missing, unexpected = sorted(set(trainable) - set(tensors)), sorted(set(tensors) - set(trainable))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {source} does not hold this run's trained tensors (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}): it is from another run")
    with torch.no_grad():
        for name, value in trainable.items():
            value.copy_(tensors[name])


# ------------------------------------------------------------------------------ full tensors of FSDP2 shards
def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """CPU copies of full tensors, gathered one at a time from shards (DTensors) where needed.

    A collective when any tensor is sharded: every rank calls it with the same names in the same order; only
    where `keep` are the copies kept (rank 0 writes; the others need not hold a second full model in memory).
    """
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().cpu()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """`optimizer.state_dict()` with full tensors: the layout of an unsharded run. A collective when sharded."""
    sd = optimizer.state_dict()
    state = {i: full_tensors(sd["state"][i], keep) for i in sorted(sd["state"])}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full-tensor optimizer state (any run's checkpoint) into an optimizer over plain or sharded
    parameters: each rank keeps the slice of every tensor that matches its shard of the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        p = params[int(index)]
        if not isinstance(p, DTensor):
            continue
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == p.shape:  # moments; the step count stays as it is
                entry[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    optimizer.load_state_dict(state)
