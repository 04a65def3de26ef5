"""A resumed run is the same run: teacher, student and data fingerprints are saved and a resume with other ones is
refused naming both; the demo does the same with its folder."""

import json
import shutil

import pytest

from matvlm.distill import DistillConfig, distill
from matvlm.errors import OutputError, ResumeMismatch
from matvlm.io.fingerprint import data_fingerprint, model_fingerprint
from matvlm.synthetic.demo import DEMO_INPUTS, DemoConfig, claim_output
from matvlm.testing import tiny_llava


def test_fingerprints_follow_content_not_paths(tmp_path):
    tiny_llava("phi", seed=0).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    tiny_llava("phi", seed=1).save_pretrained(tmp_path / "b")
    a = model_fingerprint(tmp_path / "a")
    assert len(a) == 16 and a == model_fingerprint(tmp_path / "copy")
    assert a != model_fingerprint(tmp_path / "b")
    weights = tmp_path / "copy" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # the last bytes are always sampled
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(tmp_path / "copy") != a
    records = tmp_path / "train.json"
    records.write_text(json.dumps([{"id": 1}]))
    before = data_fingerprint(records)
    records.write_text(json.dumps([{"id": 2}]))
    assert data_fingerprint(records) != before


def _cfg(world, teacher, out, **kw):
    base = dict(teacher=str(teacher), out=str(out), data=str(world / "train.json"), images=[str(world / "images")],
                ratio=0.5, batch_size=4, steps=4, save_every=2, num_workers=0, max_batch_tokens=2048)
    return DistillConfig(**{**base, **kw})


def test_a_resume_with_another_teacher_or_data_is_refused(world_and_teacher, tmp_path):
    world, teacher = world_and_teacher
    out = tmp_path / "hybrid"
    distill(_cfg(world, teacher, out), progress=False, stop_at=2)
    saved = json.loads((tmp_path / "hybrid.run" / "config.json").read_text())["fingerprints"]
    assert saved == {"teacher": model_fingerprint(teacher), "data": data_fingerprint(world / "train.json")}

    other = tmp_path / "other_teacher"
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps" if "rms_norm_eps" in config["text_config"] else "layer_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ResumeMismatch, match="the teacher differs") as err:
        distill(_cfg(world, other, out), resume=True, progress=False)
    assert saved["teacher"] in str(err.value) and model_fingerprint(other) in str(err.value)

    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads((world / "train.json").read_text())[:8]))
    with pytest.raises(ResumeMismatch, match="the data differs"):
        distill(_cfg(world, teacher, out, data=str(fewer)), resume=True, progress=False)

    moved = tmp_path / "moved_teacher"  # the same teacher elsewhere is the same teacher
    shutil.copytree(teacher, moved)
    summary = distill(_cfg(world, moved, out), resume=True, progress=False)
    assert summary["steps"] == 4 and (out / "config.json").exists()


def test_the_demo_folder_belongs_to_one_teacher(tmp_path):
    tiny_llava("phi", seed=0).save_pretrained(tmp_path / "t0")
    tiny_llava("phi", seed=1).save_pretrained(tmp_path / "t1")
    out = tmp_path / "demo"
    claim_output(DemoConfig(out=str(out), teacher=str(tmp_path / "t0")), out)
    (out / "hybrid.run").mkdir()  # the runs a later demo resumes
    claim_output(DemoConfig(out=str(out), teacher=str(tmp_path / "t0")), out)  # same teacher: continues
    with pytest.raises(ResumeMismatch, match="another teacher") as err:
        claim_output(DemoConfig(out=str(out), teacher=str(tmp_path / "t1")), out)
    assert model_fingerprint(tmp_path / "t0") in str(err.value) and model_fingerprint(tmp_path / "t1") in str(err.value)
    assert (out / "hybrid.run").exists()
    claim_output(DemoConfig(out=str(out), teacher=str(tmp_path / "t1"), overwrite=True), out)
    assert not (out / "hybrid.run").exists()
    assert json.loads((out / DEMO_INPUTS).read_text())["fingerprints"]["teacher"] == model_fingerprint(tmp_path / "t1")

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match="holds no demo"):
        claim_output(DemoConfig(out=str(stranger), teacher=str(tmp_path / "t0")), stranger)
    with pytest.raises(OutputError, match="it is the teacher"):
        claim_output(DemoConfig(out=str(tmp_path / "t0"), teacher=str(tmp_path / "t0"), overwrite=True), tmp_path / "t0")
    assert (tmp_path / "t0" / "config.json").exists()
