"""Inputs are checked before long work: every bad record and image listed by id, damaged model files named."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from matvlm.cli import app
from matvlm.data.checks import checked_records, scan_records
from matvlm.errors import InputError
from matvlm.io import load_vlm
from matvlm.testing import tiny_llava

runner = CliRunner()


def shown(needle: str, output: str) -> bool:
    """Whether the console printed `needle`: it wraps long lines, even inside a path."""
    return "".join(needle.split()) in "".join(output.split())


@pytest.fixture
def damaged_world(world_and_teacher, tmp_path):
    """A copy of the world's training records with a missing image, a truncated image and a malformed record."""
    world, _ = world_and_teacher
    records = json.loads((world / "train.json").read_text())
    shutil.copytree(world / "images", tmp_path / "images")
    (tmp_path / "images" / records[3]["image"]).unlink()
    png = tmp_path / "images" / records[5]["image"]
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    records[7]["conversations"] = [{"from": "gpt", "value": "no question"}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path, records


def test_every_bad_record_and_image_is_listed_by_id(damaged_world):
    root, records = damaged_world
    good, problems = scan_records(root / "train.json", [root / "images"], workers=2)
    assert sorted(str(p.record) for p in problems) == sorted(str(records[i]["id"]) for i in (3, 5, 7))
    assert len(good) == len(records) - 3
    with pytest.raises(InputError) as err:
        checked_records(root / "train.json", [root / "images"])
    message = str(err.value)
    assert "3 bad record(s)" in message and "--skip-bad" in message
    assert all(str(records[i]["id"]) in message for i in (3, 5, 7))
    assert "file not found" in message and "cannot be decoded" in message
    logged = []
    assert len(checked_records(root / "train.json", [root / "images"], skip_bad=True, log=logged.append)) == len(good)
    assert "skipping 3 bad record(s)" in logged[0]


def test_distill_stops_on_a_bad_image_before_training(world_and_teacher, damaged_world, tmp_path):
    _, teacher = world_and_teacher
    root, records = damaged_world
    args = ["distill", "--teacher", str(teacher), "--data", str(root / "train.json"), "--steps", "2",
            "--batch-size", "4", "--num-workers", "0", "--ratio", "0.5"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "h")])
    assert result.exit_code == 2, result.output
    assert shown("3 bad record(s)", result.output) and str(records[3]["id"]) in result.output
    assert not list((tmp_path / "h.run").glob("checkpoint*"))  # stopped before the first step
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "h2"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert load_vlm(tmp_path / "h2").config.mamba_layers


def test_a_truncated_weight_file_is_named(tmp_path):
    tiny_llava("phi").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(InputError, match="model.safetensors is truncated"):
        load_vlm(tmp_path / "m")
    result = runner.invoke(app, ["convert", str(tmp_path / "m"), str(tmp_path / "h")])
    assert result.exit_code == 2 and shown("model.safetensors is truncated", result.output), result.output
    weights.write_bytes(b"\x01")
    with pytest.raises(InputError, match="not a safetensors file"):
        load_vlm(tmp_path / "m")


def test_convert_on_a_folder_without_weights_says_so(tmp_path):
    tiny_llava("phi").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    result = runner.invoke(app, ["convert", str(tmp_path / "m"), str(tmp_path / "h")])
    assert result.exit_code == 2 and shown("no weight files", result.output), result.output
    assert not (tmp_path / "h").exists()
