import json

import numpy as np
from PIL import Image

from matvlm.synthetic.scene import COLORS, cell_size
from matvlm.synthetic.world import generate_world
from matvlm.synthetic.where import where_records


def test_where_records_are_deterministic_right_and_avoid_heldout_pairs(tmp_path):
    world = tmp_path / "world"
    generate_world(world, n_train=4, n_test=2, seed=5, image_size=64)
    held = {tuple(p) for p in json.loads((world / "world.json").read_text())["heldout"]["color_shape_pairs"]}
    recs = where_records(tmp_path / "a", 20, seed=1, world_json=world / "world.json", image_size=64, max_objects=5)
    again = where_records(tmp_path / "b", 20, seed=1, world_json=world / "world.json", image_size=64, max_objects=5)
    assert recs == again and recs != where_records(tmp_path / "c", 20, seed=2, image_size=64)
    assert [r["family"] for r in recs] == ["where1"] * 20 + ["where", "where_list"] * 20
    cell = cell_size(64)
    for r in recs:
        if r["family"] == "where_list":  # every object once, in reading order, on the image of the record before
            objs = sorted(r["scene"]["objects"], key=lambda o: (o["row"], o["col"]))
            assert r["conversations"][1]["value"] == ", ".join(
                f"a {o['color']} {o['shape']} in row {o['row'] + 1}, column {o['col'] + 1}" for o in objs)
            continue
        objs = r["scene"]["objects"]
        assert (len(objs) == 1) == (r["family"] == "where1") and len(objs) <= 5
        assert not any((o["color"], o["shape"]) in held for o in objs)
        color, shape = r["conversations"][0]["value"].removeprefix("<image>\nWhere is the ").removesuffix("?").split()
        named = [o for o in objs if (o["color"], o["shape"]) == (color, shape)]
        assert len(named) == 1  # the question names exactly one object
        o = named[0]
        assert r["conversations"][1]["value"] == f"row {o['row'] + 1}, column {o['col'] + 1}"
        # the answer's cell of the drawn image holds that object's colour
        pixels = np.asarray(Image.open(tmp_path / "a" / r["image"]))
        patch = pixels[o["row"] * cell:(o["row"] + 1) * cell, o["col"] * cell:(o["col"] + 1) * cell].reshape(-1, 3)
        assert (np.abs(patch.astype(int) - COLORS[color]).sum(1) < 30).any()
    assert not list((tmp_path / "a").glob("*.tmp"))
