"""`matvlm eval` end to end on a tiny world and an untrained teacher: table, JSON, bad records."""

import json

import pytest
from typer.testing import CliRunner

from matvlm.cli import app
from matvlm.synthetic.world import generate_world
from matvlm.synthetic.teacher import TeacherConfig, train_teacher

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate_world(root / "world", n_train=16, n_test=9, seed=1, image_size=64)
    cfg = TeacherConfig(
        data=str(root / "world"), out=str(root / "teacher"), vocab_size=400, image_size=64, patch_size=16,
        vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64,
        max_length=1024, batch_size=4, steps=2, eval_every=0, save_every=2, num_workers=0, final_eval_records=1,
    )
    train_teacher(cfg, progress=False)
    return root


def test_eval_writes_scores_for_every_family(setup):
    out = setup / "scores.json"
    result = runner.invoke(app, ["eval", str(setup / "teacher"), "--data", str(setup / "world" / "test.json"),
                                 "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["n"] == 9 and len(scores["families"]) == 9 and scores["missing"] == []
    assert scores["tokens_per_second"] > 0 and scores["template"] == "phi"
    assert len(scores["records"]) == 9 and all("prediction" in r for r in scores["records"])
    assert "Average" in result.output


def test_eval_on_the_first_records_of_each_family(setup):
    out = setup / "train_sample.json"
    result = runner.invoke(app, ["eval", str(setup / "teacher"), "--data", str(setup / "world" / "train.json"),
                                 "--per-family", "1", "--batch-size", "4", "--max-new-tokens", "4", "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    written = json.loads((setup / "world" / "train.json").read_text())
    firsts = {}
    for r in written:
        firsts.setdefault(r["family"], r["id"])
    assert scores["n"] == 9 and [r["id"] for r in scores["records"]] == list(firsts.values())


def test_bad_records_stop_or_are_skipped(setup):
    records = json.loads((setup / "world" / "test.json").read_text())
    records[2]["image"] = "test/does-not-exist.png"
    records[4]["conversations"] = [{"from": "gpt", "value": "no question"}]
    bad = setup / "world" / "bad.json"
    bad.write_text(json.dumps(records))
    args = ["eval", str(setup / "teacher"), "--data", str(bad), "--max-new-tokens", "2", "--device", "cpu"]
    result = runner.invoke(app, args + ["--out", str(setup / "bad1.json")])
    assert result.exit_code == 2
    assert records[4]["id"] in result.output or records[2]["id"] in result.output
    assert not (setup / "bad1.json").exists()
    result = runner.invoke(app, args + ["--skip-bad", "--out", str(setup / "bad2.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((setup / "bad2.json").read_text())
    assert scores["n"] == 7 and len(scores["bad_records"]) == 2
    joined = " ".join(scores["bad_records"])
    assert records[2]["id"] in joined and records[4]["id"] in joined
