"""A tiny world and a tiny trained teacher (real tokenizer with <image>, processor, template) for the tests of
what commands refuse; a few seconds to build."""

from __future__ import annotations

import pytest

from matvlm.synthetic.teacher import TeacherConfig, train_teacher
from matvlm.synthetic.world import generate_world


def build_world_and_teacher(root):
    world = root / "world"
    generate_world(world, n_train=12, n_test=9, seed=2, image_size=64)
    teacher = root / "teacher"
    train_teacher(TeacherConfig(
        data=str(world), out=str(teacher), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32,
        vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64, max_length=1024,
        batch_size=4, steps=2, eval_every=0, save_every=2, num_workers=0, final_eval_records=1, save_dtype="float32",
    ), progress=False)
    return world, teacher


@pytest.fixture(scope="module")
def world_and_teacher(tmp_path_factory):
    return build_world_and_teacher(tmp_path_factory.mktemp("reliability"))
