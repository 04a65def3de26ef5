"""LLaVA-format records (LLaVA-665K, ShareGPT4V): reading, validation and image loading.

A record::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "The ..."}, ...]}

``image`` is absent for text-only records. Every problem is reported as a :class:`BadRecordError`
that names the file and the record, so one bad line in a 665K-record file is easy to find.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, overload

import numpy as np
from PIL import Image, UnidentifiedImageError

from matvlm.data.templates import IMAGE_TOKEN

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "BadRecordError",
    "BadImageError",
    "load_records",
    "validate_record",
    "record_label",
    "find_image",
    "load_image",
]

# Far above any LLaVA / ShareGPT4V image (SAM images are ~3.4 MP) but small enough that a
# decompression bomb cannot eat a DataLoader worker's memory (64 MP RGB = 192 MB).
DEFAULT_MAX_PIXELS = 64_000_000


class DataError(ValueError):
    """Base class of the data pipeline's errors."""


class BadRecordError(DataError):
    """A record that cannot be used. ``path``: the file it came from (None for in-memory records);
    ``record``: its id, or its index when it has no usable id; ``reason``: what is wrong."""

    def __init__(self, path: str | Path | None, record: str | int | None = None, reason: str | None = None) -> None:
        if record is None and reason is None and path is not None:
            # Rebuilt from its message alone: torch re-raises a DataLoader worker's error as
            # `type(err)(message)`, so the type survives the trip (the fields do not).
            self.path, self.record, self.reason = None, None, str(path)
            ValueError.__init__(self, str(path))
            return
        self.path = None if path is None else str(path)
        self.record = record
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" in {self.path}" if self.path else ""
        return f"bad record {self.record!r}{where}: {self.reason}"

    def __reduce__(self):  # keep the fields when pickled across DataLoader workers
        return (type(self), (self.path, self.record, self.reason))


class BadImageError(BadRecordError):
    """A record whose image is missing, unreadable, too large or in an unusable mode.
    ``path`` is the image file (or the relative name when it was not found)."""

    def _message(self) -> str:
        return f"bad image for record {self.record!r}: {self.path}: {self.reason}"


def record_label(record: Any, index: int | None) -> str | int | None:
    """How to name a record in errors: its id when it has a usable one, else its index."""
    if isinstance(record, Mapping):
        rid = record.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) != "":
            return rid
    return index


def is_text_record(record: Mapping[str, Any]) -> bool:
    """A plain-text record: ``prompt`` + ``completion`` read without a chat template or image, the loss on the
    completion (an LM's text data; the world's training-only `repeat` family)."""
    return "conversations" not in record and "completion" in record


def validate_record(
    record: Any,
    index: int | None = None,
    path: str | Path | None = None,
    image_token: str = IMAGE_TOKEN,
    require_answer: bool = True,
) -> None:
    """Raise :class:`BadRecordError` unless ``record`` is a usable LLaVA record.

    Rules: ``id`` is a non-empty string or int; ``conversations`` is a non-empty list of
    ``{"from": "human"|"gpt", "value": non-empty str}`` alternating human/gpt, starting with human and
    (when ``require_answer``) ending with gpt; at most one ``image_token`` in the whole conversation,
    only in a human turn; exactly one when the record has ``image`` (a single relative path string),
    none when it has not (a placeholder without an image would give the model no features).

    A plain-text record (`is_text_record`: ``completion`` and no ``conversations``, the prompt-completion
    form of text data sets) has an optional string ``prompt``, a non-empty string ``completion`` and no image.
    """
    label = record_label(record, index)

    def bad(reason: str) -> BadRecordError:
        return BadRecordError(path, label, reason)

    if not isinstance(record, Mapping):
        raise bad(f"a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is None:
        raise bad("missing 'id'")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise bad(f"'id' must be a non-empty string or integer, got {rid!r}")

    if is_text_record(record):
        if not isinstance(record.get("prompt", ""), str):
            raise bad("'prompt' must be a string")
        if not isinstance(record["completion"], str) or not record["completion"].strip():
            raise bad("'completion' must be a non-empty string")
        if record.get("image") is not None:
            raise bad("a plain-text record (prompt/completion) cannot have an 'image'")
        return
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise bad("'conversations' must be a non-empty list")
    n_images = 0
    for i, turn in enumerate(convs):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, Mapping):
            raise bad(f"conversations[{i}] must be an object with 'from' and 'value'")
        if turn.get("from") != expected:
            raise bad(
                f"conversations[{i}] is from {turn.get('from')!r}, expected {expected!r} "
                "(turns must alternate human/gpt, starting with human)"
            )
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise bad(f"conversations[{i}] ({expected}) has an empty or non-string 'value'")
        count = value.count(image_token)
        if count and expected == "gpt":
            raise bad(f"conversations[{i}]: {image_token} in a gpt answer")
        n_images += count
    if require_answer and len(convs) % 2 != 0:
        raise bad("the conversation must end with a gpt answer")
    if n_images > 1:
        raise bad(f"{n_images} {image_token} placeholders; at most one is supported")

    if "image" in record and record["image"] is not None:
        image = record["image"]
        if isinstance(image, list):
            raise bad("multi-image records ('image' is a list) are not supported")
        if not isinstance(image, str) or not image.strip():
            raise bad(f"'image' must be a non-empty relative path, got {image!r}")
        if n_images != 1:
            raise bad(f"the record has an image but no {image_token} placeholder in its conversation")
    elif n_images:
        raise bad(f"{image_token} placeholder but the record has no 'image'")


@overload
def load_records(
    json_path: str | Path, skip_bad: Literal[False] = ..., image_token: str = ...
) -> list[dict]: ...
@overload
def load_records(
    json_path: str | Path, skip_bad: Literal[True], image_token: str = ...
) -> tuple[list[dict], list[BadRecordError]]: ...
def load_records(
    json_path: str | Path, skip_bad: bool = False, image_token: str = IMAGE_TOKEN
) -> list[dict] | tuple[list[dict], list[BadRecordError]]:
    """Read a LLaVA JSON file (a list of records; ``.jsonl``: one record per line) and validate every
    record with :func:`validate_record`.

    ``skip_bad=False``: the first bad record raises :class:`BadRecordError`.
    ``skip_bad=True``: returns ``(good_records, problems)`` with one error per skipped record.
    A file that is missing or not valid JSON always raises (:class:`DataError`).
    """
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"record file not found: {path}")
    raw = _read_json(path)
    records: list[dict] = []
    problems: list[BadRecordError] = []
    for index, record in enumerate(raw):
        try:
            validate_record(record, index=index, path=path, image_token=image_token)
        except BadRecordError as err:
            if not skip_bad:
                raise
            problems.append(err)
            continue
        records.append(record)
    return (records, problems) if skip_bad else records


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({err.msg})") from err
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def find_image(
    relative: str, image_folders: Sequence[str | Path], record: str | int | None = None
) -> Path:
    """The first ``folder / relative`` that is a file, in folder order (so a list of folders can
    overlay e.g. ShareGPT4V's extra images on LLaVA's). Raises :class:`BadImageError` listing the
    folders searched."""
    rel = Path(relative)
    if rel.is_absolute():
        if rel.is_file():
            return rel
        raise BadImageError(rel, record, "file not found")
    for folder in image_folders:
        candidate = Path(folder) / rel
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(f) for f in image_folders) or "(no image folders given)"
    raise BadImageError(relative, record, f"file not found in any image folder: {searched}")


def load_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, record: str | int | None = None
) -> Image.Image:
    """Open an image as RGB, or raise :class:`BadImageError` naming the record and file.

    Checks the pixel count from the header before decoding (decompression bombs), fails on
    truncated/corrupt files (no silent half images), and converts odd modes: palette and alpha
    images are composited on white (dropping alpha would expose whatever colour hides under
    transparent pixels, often black), 16-bit greyscale is scaled to 8 bits (a plain convert clips
    it to nearly white), CMYK/YCbCr/LAB/HSV/L/1 are converted. Float images (mode F) are rejected:
    their value range is unknown. EXIF orientation is not applied, as in LLaVA/TinyLLaVA training.
    """
    path = Path(path)

    def bad(reason: str) -> BadImageError:
        return BadImageError(path, record, reason)

    if not path.is_file():
        raise bad("file not found")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise bad(f"too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
            im.load()
            return to_rgb(im, bad)
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise bad(f"too large (decompression bomb guard): {err}") from err
    except UnidentifiedImageError as err:
        raise bad("not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise bad(f"cannot be decoded ({type(err).__name__}: {err})") from err


def to_rgb(im: Image.Image, bad) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in im.info):
        return _flatten_alpha(im.convert("RGBA"))
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _flatten_alpha(im.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.float64)
        # 16-bit data (or 32-bit int holding 16-bit data, as older Pillow loads 16-bit PNGs):
        # scale the full 16-bit range to 8 bits. 'I' images already in 0..255 are kept as is.
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise bad("32-bit float image (mode F) is not supported: its value range is unknown")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise bad(f"image mode {mode!r} cannot be converted to RGB ({err})") from err


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
