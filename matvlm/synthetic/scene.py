"""Scenes of the synthetic world: the vocabulary of objects, their layout, and drawing them with PIL.

A scene is a plain JSON-able dict (it is stored in every record), so that answers can be recomputed
from it and images re-rendered from it:

    {"image_size": 128, "background": "white",
     "objects": [{"shape": "circle", "color": "red", "size": "large",
                  "x": 40, "y": 41, "r": 12, "row": 1, "col": 1}, ...],
     "text": {"string": "lighthouse", "font_size": 16, "box": [x0, y0, x1, y1]}}   # optional

Objects sit on a GRID x GRID grid of cells, at most one per cell and fully inside it, so they never
overlap and reading order (row, then column) is well defined. A text panel takes two whole grid rows.
"""

from __future__ import annotations

import functools
import math
import random
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated object colours, far from each other and from every background (min L1 distance > 100).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 40, 190),
    "orange": (250, 130, 0),
    "cyan": (0, 200, 210),
    "brown": (120, 70, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (190, 190, 190),
    "beige": (235, 222, 190),
}
PANEL_FILL = (255, 255, 255)
PANEL_OUTLINE = (60, 60, 60)
TEXT_FILL = (0, 0, 0)

GRID = 4  # cells per side; at most GRID * GRID objects
# Half-extent of a shape as a fraction of the cell side: large / small differ by ~1.7x in diameter.
RADIUS = {"large": 0.37, "small": 0.22}
# Font sizes for the text panel as fractions of the image side (12..22 px at 128 px).
FONT_MIN = 12 / 128
FONT_MAX = 22 / 128


class Obj(NamedTuple):
    """The attributes of one object (its position is decided when it is placed)."""

    shape: str
    color: str
    size: str


def cell_size(image_size: int) -> int:
    return image_size // GRID


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's embedded default font: identical on every machine with the same Pillow build.
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def place(rng: random.Random, objs: list[Obj], cells: list[tuple[int, int]], image_size: int) -> list[dict[str, Any]]:
    """Put object i in cells[i], jittered inside its cell; returns the scene's object dicts."""
    cell = cell_size(image_size)
    out = []
    for obj, (row, col) in zip(objs, cells, strict=True):
        r = max(2, round(RADIUS[obj.size] * cell))
        slack = max(0, cell // 2 - r - 1)  # keeps the shape inside its cell
        x = col * cell + cell // 2 + rng.randint(-slack, slack)
        y = row * cell + cell // 2 + rng.randint(-slack, slack)
        out.append({"shape": obj.shape, "color": obj.color, "size": obj.size,
                    "x": x, "y": y, "r": r, "row": row, "col": col})
    return out


def text_layout(string: str, image_size: int, top: bool) -> dict[str, Any] | None:
    """Largest font that fits `string` on one line of a panel two grid rows high; None if it cannot fit.

    One line only: a line break would hide whether the string has a space there.
    """
    cell = cell_size(image_size)
    margin = max(1, image_size // 64)
    y0 = 0 if top else image_size - 2 * cell
    box = [margin, y0 + margin, image_size - 1 - margin, y0 + 2 * cell - 1 - margin]
    room = box[2] - box[0] - 2 * margin
    lo, hi = max(6, round(FONT_MIN * image_size)), max(6, round(FONT_MAX * image_size))
    if font(lo).getlength(string) > room:
        return None
    while lo < hi:  # bisect: text width grows with the font size
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font(mid).getlength(string) <= room else (lo, mid - 1)
    return {"string": string, "font_size": lo, "box": box}


def _polygon(cx: float, cy: float, r: float, n: int, start_deg: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    """Regular polygon (or star, when `inner` gives the inner radius ratio) centred on (cx, cy)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r * (inner if inner and k % 2 else 1.0)
        a = math.radians(start_deg + 360.0 * k / steps)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, fill: tuple[int, int, int]) -> None:
    """Filled, not antialiased: every pixel of a shape has exactly its colour, centre included."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        h = round(0.82 * r)  # a square of the same half-extent would look much bigger than the circle
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y, r, 3, -90), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(x, y, r, 4, -90), fill=fill)
    elif shape == "cross":
        w = max(1, round(0.32 * r))
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, r, 5, -90, inner=0.45), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(x, y, r, 6, 0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene dict as an RGB image of scene['image_size'] pixels."""
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], o["x"], o["y"], o["r"], COLORS[o["color"]])
    text = scene.get("text")
    if text:
        x0, y0, x1, y1 = text["box"]
        draw.rectangle([x0, y0, x1, y1], fill=PANEL_FILL, outline=PANEL_OUTLINE)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text["string"], fill=TEXT_FILL,
                  font=font(text["font_size"]), anchor="mm")
    return img


def png_bytes(img: Image.Image) -> bytes:
    """RGB image as a PNG file: rows unfiltered, zlib level 1.

    About 3x faster than Pillow's encoder (which tries filters per row) on these flat images, at the same
    file size (~1.3 kB), and the bytes depend only on the pixels and zlib.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got {img.mode}")
    width, height = img.size
    pixels = np.asarray(img).reshape(height, 3 * width)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")
