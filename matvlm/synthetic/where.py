"""Training-only "where" records: "Where is the red circle?" -> "row 2, column 3", on scenes drawn for them.

Why (benchmarks/teacher_runs.md, session 8): at the probe size, reading the cell of a named object among three
stays at chance for 5,000 steps from scratch, while the one-object question escapes its plateau after ~1,100-1,700
steps, and after it the three-object question escapes within ~600 more. So a teacher can first learn the read-out
on one-object scenes (family "where1"), then on several objects ("where"), and the world's spatial questions
build on it. A second probe reached the same by dense labels: half the batches asking for every object and its
cell in reading order ("where_list", on the several-object images). The world itself (its generator version, test
split and scores) is unchanged: these records live in the teacher's run folder, and the world's held-out
colour-shape pairs never occur in them.

At the teacher's size it did not work (session 9, teacher v6): a 2,800-step stage of all three families stayed on
its plateau (loss 0.47 -> 0.43), and the run ended 16 points below the same recipe without it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from matvlm.synthetic.scene import BACKGROUNDS, COLORS, GRID, SHAPES, SIZES, Obj, place, render

__all__ = ["where_records"]


def where_records(out_dir: str | Path, n: int, seed: int, world_json: str | Path | None = None,
                  image_size: int = 128, max_objects: int = 6) -> list[dict[str, Any]]:
    """`n` records of one object (family "where1"), `n` of 2..`max_objects` objects ("where") and, on those images,
    `n` listing every object and its cell in reading order ("where_list"), in the LLaVA schema with their scenes;
    images go to `out_dir` (kept if already there, so a resumed run reuses them). Objects in a scene have distinct
    colour-shape pairs, so the question names exactly one. Deterministic for `seed`."""
    if n < 1:
        raise ValueError(f"where_records: n must be >= 1, got {n}")
    if not 2 <= max_objects <= GRID * GRID:
        raise ValueError(f"where_records: max_objects must be in 2..{GRID * GRID}, got {max_objects}")
    held: set[tuple[str, str]] = set()
    if world_json is not None and Path(world_json).exists():
        held = {tuple(p) for p in json.loads(Path(world_json).read_text())["heldout"]["color_shape_pairs"]}
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    records = []
    for i in range(2 * n):
        k = 1 if i < n else rng.randint(2, max_objects)
        chosen = rng.sample(pairs, k)
        objs = place(rng, [Obj(s, c, rng.choice(SIZES)) for c, s in chosen], rng.sample(cells, k), image_size)
        scene = {"image_size": image_size, "background": rng.choice(list(BACKGROUNDS)), "objects": objs}
        name = f"where-{i:07d}.png"
        if not (out_dir / name).exists():  # written whole or not at all, so a resumed run never meets half a file
            render(scene).save(out_dir / f"{name}.tmp", format="PNG")
            (out_dir / f"{name}.tmp").replace(out_dir / name)
        o = rng.choice(objs)
        records.append({
            "id": f"where-{i:07d}", "image": name, "family": "where1" if k == 1 else "where", "metric": "exact",
            "conversations": [{"from": "human", "value": f"<image>\nWhere is the {o['color']} {o['shape']}?"},
                              {"from": "gpt", "value": _cell(o)}],
            "answers": [_cell(o)], "scene": scene,
        })
        if k > 1:
            listed = ", ".join(f"a {p['color']} {p['shape']} in {_cell(p)}"
                               for p in sorted(objs, key=lambda p: (p["row"], p["col"])))
            records.append({
                "id": f"where-{i:07d}-list", "image": name, "family": "where_list", "metric": "exact",
                "conversations": [{"from": "human", "value": "<image>\nList the objects and where they are."},
                                  {"from": "gpt", "value": listed}],
                "answers": [listed], "scene": scene,
            })
    return records


def _cell(obj: dict[str, Any]) -> str:
    return f"row {obj['row'] + 1}, column {obj['col'] + 1}"
