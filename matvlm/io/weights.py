"""The weight files of a model folder, and a cheap check that each safetensors file is whole."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from matvlm.errors import InputError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The folder's weight files (safetensors, torch pickles), sorted by name; index files are not weights."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES))


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """-> (header, bytes of tensor data the header promises). Raises InputError naming the file when the header
    cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is truncated or empty ({size} bytes): not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise InputError(f"{path} is truncated: its header alone needs {length:,} bytes, the file has {size:,}")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} is damaged: its header is not valid JSON ({err})") from err
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    return header, 8 + length + max(ends, default=0)


def check_weight_files(model_dir: str | Path) -> list[Path]:
    """Refuse a model folder without weights, or with a safetensors file shorter than its header says (an
    interrupted download or copy), naming the file; returns the weight files."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise InputError(f"{model_dir} has a config.json but no weight files (*.safetensors or *.bin): "
                         "an incomplete copy or download?")
    for path in files:
        if path.suffix == ".safetensors":
            _, needed = safetensors_header(path)
            size = path.stat().st_size
            if size < needed:
                raise InputError(f"{path} is truncated: it should hold {needed:,} bytes and has {size:,} "
                                 "(an interrupted download or copy?)")
    return files
