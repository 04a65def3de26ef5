"""Atomic writes: a file or directory is either the old one or the whole new one, never half written."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to a temp file in the same folder (same filesystem, so the rename is atomic), fsync it,
    then rename it onto `path`. On any error the temp file is removed and `path` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; keep an existing file's mode, else 0644.
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays, paths, sets.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON so that ``path`` is either the old file or the new one.

    See `write_bytes_atomic`. Parent folders are created. Returns the path.
    """
    # Serialise first: a non-serialisable object fails before touching disk.
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n"
    return write_text_atomic(path, text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer_pid(name: str, marker: str) -> int | None:
    """The process id in `.OUT.tmp-PID-XXXX` / `.OUT.old-PID`, or None for a name without one."""
    head = name.split(marker, 1)[1].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_interrupted_writes(out: str | Path) -> list[str]:
    """Tidy what an interrupted `atomic_directory(out)` left beside `out`; returns one sentence per action.

    `.OUT.tmp-PID-*` is a half-written new version: removed. `.OUT.old-PID` is the previous version, moved aside
    just before the new one was renamed in: removed when `out` exists, else put back as `out` (the kill came
    between the two renames). Only leftovers of processes that are no longer running are touched.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    notes = []
    for item in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        for marker in (".tmp-", ".old-"):
            if not item.name.startswith(f".{out.name}{marker}"):
                continue
            pid = _writer_pid(item.name, marker)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue  # a write in progress
            if marker == ".old-" and not out.exists():
                try:
                    os.replace(item, out)
                except FileNotFoundError:  # another process of the same launch put it back first
                    continue
                notes.append(f"restored {out} from {item.name}, left by an interrupted write")
            else:
                shutil.rmtree(item, ignore_errors=True)
                notes.append(f"removed {item}, left by an interrupted write to {out}")
    return notes


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out` and rename it into place only if the block succeeds.

    An interrupted write leaves no directory that looks like a finished one at `out`; its leftovers are tidied by
    the next write to `out` (`clean_interrupted_writes`).
    """
    out = Path(out)
    clean_interrupted_writes(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name tells a later write whether this one is still running.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
