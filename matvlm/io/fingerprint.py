"""Cheap fingerprints of a run's inputs, so a resumed run can tell it has the same teacher, student and data.

Reading every byte of a multi-GB model at each start would cost minutes; instead a fingerprint hashes what
identifies the content: a model folder's config.json, and for each weight file its name, size, safetensors
header (every tensor's name, shape, dtype and offsets) and evenly spaced samples of its bytes; a records file
is hashed whole up to `FULL_HASH_BYTES`, else by size and samples. Paths and modification times are left out,
so a moved or copied input keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from matvlm.errors import ResumeMismatch
from matvlm.io.weights import WEIGHT_FILE_SUFFIXES, weight_files

SAMPLE_BYTES = 1 << 16
SAMPLES = 16
FULL_HASH_BYTES = 64 << 20  # records files up to this size are hashed whole (well under a second)
DIGITS = 16


def _sample_file(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES and not path.name.endswith(WEIGHT_FILE_SUFFIXES):
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            return
        if path.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape and offsets
            head = fh.read(8)
            digest.update(fh.read(int.from_bytes(head, "little")) if len(head) == 8 else head)
        for i in range(SAMPLES):
            fh.seek(max(0, (size - SAMPLE_BYTES) * i // max(SAMPLES - 1, 1)))
            digest.update(fh.read(SAMPLE_BYTES))


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A short hex fingerprint of a model folder: its config.json and sampled weight files."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256(b"model\0")
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in weight_files(model_dir):
        _sample_file(digest, path)
    return digest.hexdigest()[:DIGITS]


def data_fingerprint(path: str | os.PathLike[str]) -> str:
    """A short hex fingerprint of a records file (whole content up to 64 MiB, else size and samples)."""
    digest = hashlib.sha256(b"data\0")
    _sample_file(digest, Path(path))
    return digest.hexdigest()[:DIGITS]


def input_fingerprints(teacher: str = "", student: str = "", data: str = "") -> dict[str, str]:
    """Fingerprints of the inputs that are given, by role: what a resumed run must match."""
    found = {}
    if teacher:
        found["teacher"] = model_fingerprint(teacher)
    if student:
        found["student"] = model_fingerprint(student)
    if data:
        found["data"] = data_fingerprint(data)
    return found


def input_changes(saved: dict[str, str], now: dict[str, str], saved_paths: dict[str, str] | None = None,
                  now_paths: dict[str, str] | None = None) -> list[str]:
    """One phrase per role whose fingerprint differs, naming both fingerprints (and paths when known)."""
    saved_paths, now_paths = saved_paths or {}, now_paths or {}
    changes = []
    for role in sorted(set(saved) | set(now)):
        before, after = saved.get(role), now.get(role)
        if before == after:
            continue
        was = f"{before or 'none'}" + (f" ({saved_paths[role]})" if saved_paths.get(role) else "")
        is_ = f"{after or 'none'}" + (f" ({now_paths[role]})" if now_paths.get(role) else "")
        changes.append(f"the {role} differs: the run started with {was}, this one has {is_}")
    return changes


def check_same_inputs(saved_config: str | os.PathLike[str], fingerprints: dict[str, str],
                      paths: dict[str, str] | None = None) -> None:
    """Refuse to resume the run whose saved config is `saved_config` with inputs of other fingerprints.

    A saved config without fingerprints (a run started by an older version) cannot be compared: accepted.
    """
    saved_config = Path(saved_config)
    if not saved_config.is_file():
        return
    saved = json.loads(saved_config.read_text())
    before = saved.get("fingerprints") or {}
    if not before:
        return
    changes = input_changes(before, fingerprints, {role: saved.get(role, "") for role in before}, paths)
    if changes:
        raise ResumeMismatch(f"cannot resume {saved_config.parent}: " + "; ".join(changes)
                             + ". Resume with the inputs the run started with, or start a new run with another --out")
