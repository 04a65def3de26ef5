"""Options are checked before any work, and `eval` keeps its answers whatever fails after generating."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from matvlm.cli import app
from matvlm.eval.predictions import read_predictions
from matvlm.model.config import MixerSettings

runner = CliRunner()


def shown(needle: str, output: str) -> bool:
    """Whether the console printed `needle`: it wraps long lines, even inside a path."""
    return "".join(needle.split()) in "".join(output.split())


def refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and shown(message, result.output), (args, result.output)
    assert "Traceback" not in result.output


def eval_args(world, teacher, tmp_path, data=None):
    return ["eval", str(teacher), "--data", str(data or world / "test.json"), "--images", str(world / "images"),
            "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "scores.json")]


def test_eval_counts_must_make_sense(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    base = eval_args(world, teacher, tmp_path)
    refused([*base, "--batch-size", "-2"], "--batch-size must be >= 1, got -2")
    refused([*base, "--per-family", "-1"], "--per-family must be >= 0, got -1")
    refused([*base, "--limit", "-1"], "--limit must be >= 0, got -1")
    refused([*base[:-4], "--max-new-tokens", "0"], "--max-new-tokens must be >= 1")
    refused([*base, "--max-new-tokens", "100000"], "must fit the model's 1,024 positions")
    (tmp_path / "empty.json").write_text("[]")
    refused(eval_args(world, teacher, tmp_path, tmp_path / "empty.json"), "no records to evaluate")
    assert not (tmp_path / "scores.json").exists()


def test_eval_refuses_records_it_could_not_score_before_generating(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    records = json.loads((world / "test.json").read_text())
    del records[1]["answers"]
    records[2]["metric"] = "bleurt"
    records[4]["id"] = records[3]["id"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    args = eval_args(world, teacher, tmp_path, tmp_path / "bad.json")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    for needle in ("3 record(s)", "has no answers", "unknown metric 'bleurt'", "duplicate id", "--skip-bad"):
        assert shown(needle, result.output), (needle, result.output)
    assert not list(tmp_path.glob("scores.predictions.jsonl*"))  # nothing was generated
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == len(records) - 3 and len(scores["bad_records"]) == 3


def test_eval_refuses_an_unwritable_output_before_generating(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = eval_args(world, teacher, tmp_path)
    refused([*args[:-1], str(blocker / "scores.json")], "is not a writable folder")
    refused([*args[:-1], str(teacher / "config.json")], "lies inside the model")


def test_eval_keeps_its_answers_when_scoring_fails_and_rescore_scores_them(world_and_teacher, tmp_path, monkeypatch):
    world, teacher = world_and_teacher
    import matvlm.eval.metrics as metrics

    real = metrics.score_records

    def broken(*args, **kwargs):
        raise ValueError("scoring broke")

    monkeypatch.setattr(metrics, "score_records", broken)
    result = runner.invoke(app, eval_args(world, teacher, tmp_path))
    assert result.exit_code == 2 and shown("scoring broke", result.output), result.output
    kept = tmp_path / "scores.predictions.jsonl"
    assert shown(f"matvlm rescore {kept}", result.output)
    meta, answers = read_predictions(kept)
    assert len(answers) == 9 and meta["template"] == "phi" and meta["generated_tokens"] > 0
    assert not (tmp_path / "scores.json").exists()

    monkeypatch.setattr(metrics, "score_records", real)
    result = runner.invoke(app, ["rescore", str(kept)])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 9 and {r["id"]: r["prediction"] for r in scores["records"]} == answers


def test_eval_writes_under_the_working_directory_by_default(world_and_teacher, tmp_path, monkeypatch):
    world, teacher = world_and_teacher
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(teacher), "--data", str(world / "test.json"), "--limit", "2",
                                 "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval-teacher-test.json").exists() and (tmp_path / "eval-teacher-test.predictions.jsonl").exists()
    assert not list(teacher.glob("eval-*"))


def test_eval_with_a_tokenizer_without_the_image_token_says_so(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    broken = tmp_path / "model"
    shutil.copytree(teacher, broken)
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<image>"]
    tokenizer["model"]["vocab"] = {k: v for k, v in tokenizer["model"]["vocab"].items() if k != "<image>"}
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.get("added_tokens_decoder", {}).clear()
    config.pop("extra_special_tokens", None)
    config.pop("image_token", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    refused(eval_args(world, broken, tmp_path), "'<image>' is not in the vocabulary")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_sentence(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    refused([*eval_args(world, teacher, tmp_path)[:-4], "--device", "cuda"], "no CUDA GPU is visible here")
    refused(["generate", str(teacher), "--prompt", "hi", "--device", "cuda"], "no CUDA GPU is visible here")
    refused(["generate", str(teacher), "--prompt", "hi", "--device", "tpu"], "use cpu, cuda or cuda:N")


def test_generate_refuses_an_answer_longer_than_the_model(world_and_teacher):
    _, teacher = world_and_teacher
    refused(["generate", str(teacher), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "1000000000"],
            "must fit the model's 1,024 positions")
    refused(["generate", str(teacher), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "0"],
            "--max-new-tokens must be >= 1")


def test_distill_ranges_are_checked_before_loading(tmp_path):
    base = ["distill", "--teacher", str(tmp_path / "t"), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o")]
    refused([*base, "--steps", "-1"], "--steps must be >= 0, got -1")
    refused([*base, "--batch-size", "0"], "--batch-size must be >= 1")
    refused([*base, "--lr", "0"], "--lr must be in (0, inf)")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"steps": "100"}))
    refused([*base, "--config", str(config)], "steps in " + str(config) + " must be an integer")
    assert not (tmp_path / "o.run").exists()


def test_distill_reports_a_diverged_loss_as_a_sentence(tmp_path, monkeypatch):
    import matvlm.distill as distill_package

    def diverges(cfg, resume=False):
        raise FloatingPointError("loss became nan at step 17; lower --lr (now 0.1)")

    monkeypatch.setattr(distill_package, "distill", diverges)
    refused(["distill", "--teacher", str(tmp_path / "t"), "--data", str(tmp_path / "d.json"), "--out",
             str(tmp_path / "o")], "training stopped: loss became nan at step 17")


def test_convert_and_synth_counts(tmp_path):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        MixerSettings(hidden_size=8, num_heads=2, head_dim=4, num_groups=2, state_size=4, chunk_size=0)
    refused(["convert", str(tmp_path), str(tmp_path / "o"), "--chunk-size", "0"], "--chunk-size must be >= 1")
    refused(["data", "synth", str(tmp_path / "w"), "--train", "-5"], "--train must be >= 0, got -5")
    refused(["data", "synth", str(tmp_path / "w"), "--train", "0", "--test", "0"], "nothing to generate")
    refused(["data", "synth", str(tmp_path / "w"), "--train", "1", "--image-size", "8"], "image_size must be >= 64")
    assert not (tmp_path / "w").exists()


def test_distill_refuses_held_out_records_it_could_not_score(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    records = json.loads((world / "test.json").read_text())
    del records[0]["answers"]
    (tmp_path / "held_out.json").write_text(json.dumps(records))
    refused(["distill", "--teacher", str(teacher), "--data", str(world / "train.json"), "--out", str(tmp_path / "h"),
             "--eval-data", str(tmp_path / "held_out.json")], "has no answers")
    assert not (tmp_path / "h.run").exists()
