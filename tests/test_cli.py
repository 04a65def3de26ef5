"""The command line: convert prints its table and writes a loadable hybrid; errors are clear."""

import json

import torch
from typer.testing import CliRunner

from matvlm.cli import app
from matvlm.io import load_vlm
from matvlm.testing import tiny_llava

runner = CliRunner()


def test_convert_command(tmp_path):
    teacher = tiny_llava("phi", num_layers=8)
    teacher.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer_config.json").write_text("{}")
    result = runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "hybrid"), "--ratio", "0.25"])
    assert result.exit_code == 0, result.output
    assert "0, 4" in result.output and "cache per token" in result.output
    hybrid = load_vlm(tmp_path / "hybrid")
    assert hybrid.config.mamba_layers == [0, 4]
    assert (tmp_path / "hybrid" / "tokenizer_config.json").exists()
    ids = torch.tensor([[1] + [teacher.config.image_token_index] * teacher.config.image_seq_length + [5]])
    assert hybrid(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape[-1] == 128

    again = runner.invoke(app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "hybrid"), "--layers", "1,2"])
    assert again.exit_code == 2 and "not empty" in again.output
    explicit = runner.invoke(
        app, ["convert", str(tmp_path / "teacher"), str(tmp_path / "h2"), "--layers", "1,2", "--overwrite"]
    )
    assert explicit.exit_code == 0, explicit.output
    assert load_vlm(tmp_path / "h2").config.mamba_layers == [1, 2]


def test_convert_errors(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no config.json" in result.output
    teacher = tiny_llava("phi")
    teacher.save_pretrained(tmp_path / "t")
    for args, message in [
        (["--ratio", "1.5"], "ratio must be in (0, 1)"),
        (["--layers", "0,9"], "out of range"),
        (["--layers", "a,b"], "comma-separated integers"),
        (["--ratio", "0.5", "--placement", "spiral"], "unknown placement"),
    ]:
        result = runner.invoke(app, ["convert", str(tmp_path / "t"), str(tmp_path / "o"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "o").exists()


def test_error_messages_keep_their_brackets():
    import typer
    from typer.testing import CliRunner

    from matvlm.cli import fail

    app = typer.Typer()

    @app.command()
    def broken() -> None:
        fail("missing tensors ['a.weight', 'b.bias'] (pip install \"matvlm[lmms]\")")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "['a.weight', 'b.bias']" in result.output and "matvlm[lmms]" in result.output


def test_teacher_refuses_a_bad_config_before_any_work(tmp_path):
    config = tmp_path / "bad.json"
    for fields, message in [({"save_every": 0}, "save_every must be >= 1"), ({"steps": -1}, "steps must be >= 1"),
                            ({"eval_records": -5}, "eval_records must be >= 0"), ({"stpes": 5}, "stpes")]:
        config.write_text(json.dumps(fields))
        result = runner.invoke(app, ["teacher", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--config", str(config)])
        assert result.exit_code == 2, (fields, result.output)
        output = " ".join(result.output.split())  # the console wraps long lines
        assert message in output and "bad.json" in output, (fields, output)
    assert not (tmp_path / "t.run").exists()


def test_rank_layers_command_writes_a_ranking_that_convert_places_by(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    ranking = tmp_path / "ranking.json"
    result = runner.invoke(app, [
        "rank-layers", str(teacher), "--data", str(world / "train.json"), "--out", str(ranking),
        "--heldout-records", "4", "--train-records", "4", "--batch-size", "2", "--align-steps", "1", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    written = json.loads(ranking.read_text())
    order = written["measures"]["kl"]["order"]
    assert sorted(order) == list(range(written["num_layers"])) and written["cost"]["kl"]["seconds"] > 0
    placed = runner.invoke(app, ["convert", str(teacher), str(tmp_path / "hybrid"), "--ratio", "0.5",
                                 "--placement", "auto", "--ranking", str(ranking)])
    assert placed.exit_code == 0, placed.output
    assert load_vlm(tmp_path / "hybrid").config.mamba_layers == sorted(order[: written["num_layers"] // 2])
    # without a ranking, auto placement is a sentence, not a traceback
    refused = runner.invoke(app, ["convert", str(teacher), str(tmp_path / "h2"), "--ratio", "0.5", "--placement", "auto"])
    assert refused.exit_code == 2 and "rank" in refused.output
