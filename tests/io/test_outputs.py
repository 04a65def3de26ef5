"""Outputs never destroy inputs or existing work; leftovers of an interrupted write are tidied."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from matvlm.cli import app
from matvlm.errors import OutputError
from matvlm.io import atomic_directory
from matvlm.io.files import clean_interrupted_writes
from matvlm.io.outputs import PACKAGE_DIR, check_output_dir, check_output_file, input_clash
from matvlm.testing import tiny_llava

runner = CliRunner()


def shown(needle: str, output: str) -> bool:
    """Whether the console printed `needle`: it wraps long lines, even inside a path."""
    return "".join(needle.split()) in "".join(output.split())


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    teacher = tmp_path / "models" / "teacher"
    teacher.mkdir(parents=True)
    data = tmp_path / "world" / "train.json"
    data.parent.mkdir()
    data.write_text("[]")
    inputs = {"teacher": teacher, "records file": data, "image folder": [tmp_path / "world" / "images"]}
    assert "it is the teacher" in input_clash(teacher, inputs)
    assert "contains the teacher" in input_clash(tmp_path / "models", inputs)
    assert "lies inside the teacher" in input_clash(teacher / "hybrid", inputs)
    assert "contains the records file" in input_clash(tmp_path / "world", inputs)
    assert input_clash(tmp_path / "world" / "hybrid", inputs) is None  # beside the records, not over them
    link = tmp_path / "link"
    link.symlink_to(teacher)
    assert "it is the teacher" in input_clash(link, inputs)  # resolved through the link
    assert "installed matvlm package" in input_clash(PACKAGE_DIR / "runs", {})
    for overwrite in (False, True):  # --overwrite never allows it
        with pytest.raises(OutputError, match="refusing to write"):
            check_output_dir(teacher, inputs, overwrite=overwrite)


def test_an_existing_folder_needs_overwrite_unless_it_is_the_runs_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(out, {})  # empty: fine
    (out / "keep.txt").write_text("work")
    with pytest.raises(OutputError, match="not empty; pass --overwrite"):
        check_output_dir(out, {})
    check_output_dir(out, {}, overwrite=True)
    check_output_dir(out, {}, own_output=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "file", {})


def test_an_unwritable_or_input_output_file_is_refused(tmp_path):
    data = tmp_path / "test.json"
    data.write_text("[]")
    with pytest.raises(OutputError, match="it is the records file"):
        check_output_file(data, {"records file": data})
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path, {})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere
            with pytest.raises(OutputError, match="not a writable folder"):
                check_output_file(locked / "sub" / "scores.json", {})
    finally:
        locked.chmod(0o700)
    check_output_file(tmp_path / "new" / "scores.json", {})


def test_leftovers_of_an_interrupted_write_are_tidied(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    half = tmp_path / f".model.tmp-{pid}-abc"
    half.mkdir()
    (half / "part").write_text("half written")
    live = tmp_path / f".model.tmp-{os.getppid()}-xyz"  # a write still running: left alone
    live.mkdir()
    previous = tmp_path / f".model.old-{pid}"
    previous.mkdir()
    (previous / "weights").write_text("old")
    notes = clean_interrupted_writes(out)
    assert not half.exists() and live.exists()
    assert (out / "weights").read_text() == "old" and not previous.exists()  # killed between the two renames
    assert any("removed" in n for n in notes) and any("restored" in n for n in notes)
    # and a later atomic write to the same folder tidies by itself
    half.mkdir()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert not half.exists() and (out / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")] == [live.name]


def test_convert_never_writes_over_its_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_llava("phi").save_pretrained(teacher)
    before = sorted(p.name for p in teacher.iterdir())
    for out in (teacher, tmp_path, teacher / "hybrid"):
        result = runner.invoke(app, ["convert", str(teacher), str(out), "--overwrite"])
        assert result.exit_code == 2 and shown("refusing to write OUT_DIR", result.output), result.output
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_data_synth_refuses_an_existing_world_without_overwrite(tmp_path):
    world = tmp_path / "world"
    args = ["data", "synth", str(world), "--train", "2", "--test", "0", "--image-size", "64"]
    assert runner.invoke(app, args).exit_code == 0
    first = (world / "train.json").read_text()
    result = runner.invoke(app, [*args[:4], "3", "--seed", "4"])
    assert result.exit_code == 2 and shown("--overwrite", result.output)
    assert (world / "train.json").read_text() == first
    result = runner.invoke(app, [*args[:4], "3", "--seed", "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((world / "train.json").read_text())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".world.")]  # no temporary folder left


def test_distill_refuses_an_output_over_its_inputs_before_any_work(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_llava("phi").save_pretrained(teacher)
    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)
    (world / "train.json").write_text("[]")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    base = ["distill", "--teacher", str(teacher), "--data", str(world / "train.json")]
    for out, message in [(teacher, "it is the teacher"), (world, "contains the records file"),
                         (world / "images" / "h", "lies inside the image folder"), (other, "not empty")]:
        result = runner.invoke(app, [*base, "--out", str(out)])
        assert result.exit_code == 2 and shown(message, result.output), (out, result.output)
    assert (other / "todo.txt").read_text() == "mine" and (world / "train.json").exists()


def test_bench_writes_under_the_working_directory_by_default():
    import inspect

    from matvlm.bench.run import bench_command
    from matvlm.cli import bench

    for default in (inspect.signature(bench).parameters["out"].default.default,
                    inspect.signature(bench_command).parameters["out"].default):
        assert str(default) == "runs/bench"
