"""Check every record and image before long work: one pass, images opened in parallel, every problem listed.

Training or evaluating for hours and then stopping at the first missing image loses the work since the last
checkpoint; `checked_records` finds all such records first. By default any problem stops the command with the
full list (ids and reasons); with `skip_bad` the bad records are left out and listed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from matvlm.data.records import DEFAULT_MAX_PIXELS, BadRecordError, find_image, load_image, load_records, record_label
from matvlm.errors import InputError

SHOWN = 20  # problems given with their reason; the ids of the rest are listed after them


def _image_problem(record: dict, folders: Sequence[str | Path], max_pixels: int) -> BadRecordError | None:
    if record.get("image") is None:
        return None
    label = record_label(record, None)
    try:
        # Decoded in full, as training will: a truncated file only shows when its last bytes are read.
        load_image(find_image(record["image"], folders, label), max_pixels=max_pixels, record=label)
    except BadRecordError as err:
        return err
    return None


def image_problems(records: Sequence[dict], image_folders: Sequence[str | Path], workers: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> list[BadRecordError | None]:
    """For each record, why its image cannot be used (None: fine or no image), decoded in a pool of threads
    (Pillow releases the GIL while decoding)."""
    workers = workers or min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda r: _image_problem(r, image_folders, max_pixels), records, chunksize=64))


def scan_records(path: str | Path, image_folders: Sequence[str | Path], workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, limit: int | None = None) -> tuple[list[dict], list[BadRecordError]]:
    """-> (usable records, problems), in file order: every record's schema and every image (`image_problems`). `limit`: only the first records of the file. A missing or
    unreadable file raises DataError."""
    records, problems = load_records(path, skip_bad=True)
    if limit is not None:
        records = records[:limit]
    found = image_problems(records, image_folders, workers, max_pixels)
    problems += [p for p in found if p is not None]
    bad = {id(r) for r, p in zip(records, found) if p is not None}
    return [r for r in records if id(r) not in bad], problems


def describe_problems(problems: Sequence[BadRecordError], source: str | Path) -> str:
    """Every bad record by id; the reasons of the first few."""
    lines = [f"{len(problems)} bad record(s) in {source}:"] + [f"  {p}" for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        rest = ", ".join(repr(p.record) for p in problems[SHOWN:])
        lines.append(f"  and {len(problems) - SHOWN} more: {rest}")
    return "\n".join(lines)


def checked_records(path: str | Path, image_folders: Sequence[str | Path], skip_bad: bool = False,
                    workers: int | None = None, log: Callable[[str], None] | None = print,
                    limit: int | None = None) -> list[dict]:
    """The usable records of `path` after `scan_records`. Problems raise InputError listing them all unless
    `skip_bad`, which leaves them out and logs the list; no usable record at all always raises."""
    records, problems = scan_records(path, image_folders, workers=workers, limit=limit)
    if problems and not skip_bad:
        raise InputError(describe_problems(problems, path) + "\nfix them, or pass --skip-bad to leave them out")
    if not records:
        raise InputError(f"no usable record in {path}" + (f" ({len(problems)} bad)" if problems else ": it is empty"))
    if problems and log is not None:
        log("skipping " + describe_problems(problems, path))
    return records
