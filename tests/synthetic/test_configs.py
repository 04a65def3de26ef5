"""Every config file in configs/ builds the config of its command, and the teacher lineage chains up."""

import json
from pathlib import Path

import pytest

from matvlm.distill import DistillConfig
from matvlm.synthetic.teacher import TeacherConfig, sdpa_choice
from matvlm.synthetic.world import FAMILIES, TRAIN_ONLY_FAMILIES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEACHER_CONFIGS = sorted(CONFIGS.glob("teacher*.json")) + sorted((CONFIGS / "teacher_lineage").glob("*.json"))
LINEAGE = sorted((CONFIGS / "teacher_lineage").glob("*.json"))


def test_every_config_is_checked_here():
    assert set(CONFIGS.rglob("*.json")) == set(TEACHER_CONFIGS) | {CONFIGS / "ddp_teacher.json", CONFIGS / "ddp_distill.json"}


@pytest.mark.parametrize("path", [*TEACHER_CONFIGS, CONFIGS / "ddp_teacher.json"], ids=lambda p: p.name)
def test_teacher_configs_are_valid(path):
    # a typo found on the GPU machine costs device time: every committed config must build a TeacherConfig
    cfg = TeacherConfig(data="unused", out="unused", **json.loads(path.read_text()))
    sdpa_choice(cfg.sdpa_backends)
    for stage in cfg.stages:
        assert set(stage) <= {"steps", "families", "max_words"} and stage["steps"] >= 1, stage
    assert set(cfg.train_only_families) <= set(TRAIN_ONLY_FAMILIES)
    assert set(cfg.family_weights) <= set(FAMILIES) | set(cfg.train_only_families)


def test_distill_config_is_valid():
    DistillConfig.from_file(CONFIGS / "ddp_distill.json").loss_settings().check()


def test_the_lineage_starts_from_scratch_and_each_run_from_the_one_before():
    assert [p.name[:3] for p in LINEAGE] == [f"{n:02d}_" for n in range(1, len(LINEAGE) + 1)]
    starts = [json.loads(p.read_text()).get("init_from", "") for p in LINEAGE]
    assert starts == ["", *(f"runs/lineage/{p.stem}" for p in LINEAGE[:-1])]
    # The last run is the shipped teacher's: its recorded options, but for where it started from and the device
    # run's own paths and profiling window.
    shipped = json.loads((CONFIGS.parent / "matvlm/synthetic/assets/teacher/matvlm.json").read_text())["config"]
    last = json.loads(LINEAGE[-1].read_text())
    assert {k: shipped[k] for k in last if k != "init_from"} == {k: v for k, v in last.items() if k != "init_from"}
    known = set(vars(TeacherConfig(data="unused", out="unused")))
    removed = {k: v for k, v in shipped.items() if k not in known}  # options the trainer no longer has
    assert removed == {"all_digit_groups": False, "where_records": 0, "where_max_objects": 6, "position_lr_scale": 1.0,
                       "text_only_families": [], "final_answer_families": []}  # all unused: at their defaults
