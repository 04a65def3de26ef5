"""Distillation: losses against naive references, the shared-weight teacher pass, what trains, the trainer
(loss falls, exact resume, output loads), and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from matvlm.convert import to_hybrid
from matvlm.data.synth import generate_world
from matvlm.distill import DistillConfig, Distiller, LossSettings, distill
from matvlm.distill.losses import layer_loss, logit_losses
from matvlm.io import load_vlm
from matvlm.teacher import TeacherConfig, train_teacher
from matvlm.training import list_checkpoints

from .conftest import launch_on_cpu, make_prompt


# ------------------------------------------------------------------------------------------ losses
def test_chunked_logit_losses_equal_full_logit_reference():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    s = torch.randn(37, 16, requires_grad=True)
    t = torch.randn(37, 16)
    mask = torch.rand(37) > 0.3
    targets = torch.randint(0, 50, (37,))
    targets[torch.rand(37) > 0.5] = -100
    T = 2.0
    kl, ce = logit_losses(head, s, t, mask, targets, temperature=T, chunk_size=8)
    (kl + ce).backward()
    grad = s.grad.clone()
    s.grad = None

    s_logits, t_logits = head(s), head(t)
    per_pos = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                       reduction="none").sum(-1)
    ref_kl = (per_pos * mask).sum() * T * T
    ref_ce = F.cross_entropy(s_logits, targets, ignore_index=-100, reduction="sum")
    (ref_kl + ref_ce).backward()
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-6)
    assert float(kl.detach()) > 0


def test_kl_is_zero_for_identical_states():
    head = torch.nn.Linear(8, 20)
    h = torch.randn(10, 8)
    kl, _ = logit_losses(head, h, h, torch.ones(10, dtype=torch.bool), torch.full((10,), -100))
    assert abs(float(kl.detach())) < 1e-5


def test_layer_loss_forms():
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    d = (a - b) * mask[..., None]
    ref_frob = d[0].norm() + d[1].norm()
    torch.testing.assert_close(layer_loss(a, b, mask, "frobenius"), ref_frob)
    torch.testing.assert_close(layer_loss(a, b, mask, "mse"), d.pow(2).sum() / 4)
    # Padded positions do not count, whatever they hold.
    b2 = b.clone()
    b2[0, 3:] += 100
    torch.testing.assert_close(layer_loss(a, b2, mask, "mse"), layer_loss(a, b, mask, "mse"))
    with pytest.raises(ValueError, match="unknown layer loss"):
        layer_loss(a, b, mask, "l1")


# ------------------------------------------------------------------------------------------ distiller
def _batch(config, lengths=(9, 6)):
    rows, pixels = [], []
    for seed, n in enumerate(lengths):
        ids, px = make_prompt(config, list(range(5, 5 + n)), seed=seed)
        rows.append(ids[0])
        pixels.append(px)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), 3)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
    labels[:, : config.image_seq_length + 1] = -100
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=torch.cat(pixels))


def test_teacher_pass_with_shared_weights_equals_the_teacher(teacher):
    teacher.eval()
    student = to_hybrid(teacher, ratio=0.5)
    d = Distiller(teacher, student, LossSettings()).eval()
    b = _batch(teacher.config)
    with torch.no_grad():
        ref = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                            output_hidden_states=True)
        embeds = student.model.language_model.get_input_embeddings()(b["input_ids"])
        hidden, seen = d.teacher_pass(embeds, b["input_ids"], b["attention_mask"], d.vision_features(b["pixel_values"]))
    valid = b["attention_mask"].bool()
    torch.testing.assert_close(hidden[valid], ref.last_hidden_state[valid], rtol=1e-5, atol=1e-5)
    for i in student.config.mamba_layers:  # hidden_states[i + 1] is the output of layer i
        torch.testing.assert_close(seen[i]["output"][valid], ref.hidden_states[i + 1][valid], rtol=1e-5, atol=1e-5)
    # The swap is undone: the student's layers hold mixers again.
    assert all(type(m).__name__ == "Mamba2Mixer" for m in student.mixers().values())


def test_losses_match_an_independent_two_model_computation(teacher):
    teacher.eval()
    student = to_hybrid(teacher, ratio=0.5)
    settings = LossSettings(alpha_layer=1.0, beta_kl=1.0, gamma_ce=1.0, temperature=2.0, layer_loss="mse")
    d = Distiller(teacher, student, settings).eval()
    b = _batch(teacher.config)
    parts = d(**b)
    with torch.no_grad():
        t_out = teacher(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}, output_hidden_states=True)
        s_out = student(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    valid = b["attention_mask"].bool()
    T = 2.0
    nxt = valid[:, 1:]
    kl = F.kl_div(F.log_softmax(s_out.logits[:, :-1] / T, -1), F.log_softmax(t_out.logits[:, :-1] / T, -1),
                  log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(parts["kl"].detach(), (kl * nxt).sum() * T * T, rtol=1e-4, atol=1e-4)
    ce = F.cross_entropy(s_out.logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(parts["ce"].detach(), ce, rtol=1e-4, atol=1e-4)
    # Layer loss: the student's decoder layer i run on the teacher's input to layer i.
    ref_layer = 0.0
    layers = student.model.language_model.layers
    for i in student.config.mamba_layers:
        x_in = t_out.hidden_states[i]
        with torch.no_grad():
            y = layers[i](x_in, attention_mask=None, position_embeddings=None)
        y = y[0] if isinstance(y, tuple) else y
        ref_layer += ((y - t_out.hidden_states[i + 1]).pow(2).mean(-1) * valid).sum()
    torch.testing.assert_close(parts["layer"].detach(), ref_layer, rtol=1e-4, atol=1e-5)


def test_only_mixers_and_connector_train_and_frozen_parts_stay_in_eval(teacher):
    student = to_hybrid(teacher, ratio=0.5)
    d = Distiller(teacher, student, LossSettings(gamma_ce=1.0)).train()
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n or "multi_modal_projector" in n for n in trainable)
    assert not any(n.startswith("teacher_") for n in trainable)
    assert all(f"layers.{i}.self_attn" in " ".join(trainable) for i in student.config.mamba_layers)
    assert not student.model.vision_tower.training and not student.lm_head.training
    assert all(m.training for m in student.mixers().values())
    teacher_proj = {k: v.clone() for k, v in d.teacher_projector.state_dict().items()}
    parts = d(**_batch(teacher.config))
    (parts["layer"] + parts["kl"] + parts["ce"]).backward()
    for n, p in d.named_parameters():
        assert (p.grad is not None) == p.requires_grad or p.grad is None, n
    assert all(p.grad is not None for n, p in d.named_parameters() if ".self_attn." in n and p.requires_grad)
    for k, v in d.teacher_projector.state_dict().items():
        assert torch.equal(v, teacher_proj[k])
    d2 = Distiller(teacher, to_hybrid(teacher, ratio=0.5), LossSettings(), train_connector=False)
    assert not any("multi_modal_projector" in n for n, p in d2.named_parameters() if p.requires_grad)


def test_mismatched_student_is_refused(teacher, family):
    from matvlm.tiny import tiny_llava

    student = to_hybrid(teacher, ratio=0.5)
    with pytest.raises(ValueError, match="not a hybrid"):
        Distiller(teacher, teacher, LossSettings())
    with pytest.raises(ValueError, match="vocab_size is"):
        Distiller(tiny_llava(family, vocab_size=96), student, LossSettings())
    with pytest.raises(ValueError, match="num_hidden_layers is"):
        Distiller(tiny_llava(family, num_layers=6), student, LossSettings())
    with pytest.raises(ValueError, match="not converted from this teacher.*values differ"):
        Distiller(tiny_llava(family, seed=1), student, LossSettings())
    with pytest.raises(ValueError, match="kl_positions"):
        Distiller(teacher, student, LossSettings(kl_positions="image"))


# ------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    world = root / "world"
    generate_world(world, n_train=40, n_test=6, seed=5, image_size=64)
    out = root / "teacher"
    train_teacher(TeacherConfig(
        data=str(world), out=str(out), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32, vision_layers=2,
        vision_heads=2, hidden=32, layers=4, heads=2, intermediate=64, max_length=1024, batch_size=4, steps=6,
        lr=3e-3, eval_every=0, save_every=6, num_workers=0, final_eval_records=2, save_dtype="float32",
    ), progress=False)
    return world, out


def _cfg(tiny_teacher, out, **kw):
    world, teacher = tiny_teacher
    base = dict(teacher=str(teacher), out=str(out), data=str(world / "train.json"), images=[str(world / "images")],
                ratio=0.5, batch_size=4, steps=8, lr=3e-3, save_every=4, num_workers=0, max_batch_tokens=2048,
                gamma_ce=0.5)
    base.update(kw)
    return DistillConfig(**base)


def _history(out):
    run = out.with_name(out.name + ".run")
    return json.loads((list_checkpoints(run)[-1] / "meta.json").read_text())["history"]


def test_distill_lowers_the_loss_and_writes_a_loadable_hybrid(tiny_teacher, tmp_path):
    out = tmp_path / "hybrid"
    # The tiny teacher is nearly uniform, so its CE stays high: watch the distillation losses alone.
    summary = distill(_cfg(tiny_teacher, out, steps=16, save_every=16, gamma_ce=0.0,
                           eval_data=str(tiny_teacher[0] / "test.json"), eval_records=3), progress=False)
    losses = [row[1] for row in summary["history"]]
    assert sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3, losses
    model = load_vlm(out)
    assert model.config.model_type == "matvlm" and model.config.mamba_layers == [0, 2]
    saved = json.loads((out / "distill_config.json").read_text())
    assert saved["ratio"] == 0.5 and saved["gamma_ce"] == 0.0
    info = json.loads((out / "matvlm.json").read_text())
    assert info["template"] == "phi" and info["distill_steps"] == 16
    assert not (out / "heldout_scores.json").exists()
    assert "average" in summary["heldout"]
    assert (out / "log.csv").read_text().startswith("step,loss,layer,kl,ce")


def test_interrupted_distillation_resumes_with_the_same_losses(tiny_teacher, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    distill(_cfg(tiny_teacher, a), progress=False)
    distill(_cfg(tiny_teacher, b), progress=False, stop_at=4)
    assert not b.exists()
    with pytest.raises(FileExistsError, match="--resume"):
        distill(_cfg(tiny_teacher, b), progress=False)
    with pytest.raises(ValueError, match="options changed"):
        distill(_cfg(tiny_teacher, b, lr=1e-3), resume=True, progress=False)
    distill(_cfg(tiny_teacher, b), resume=True, progress=False)
    ha, hb = _history(a), _history(b)
    assert [r[0] for r in hb] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([r[:5] for r in ha]), torch.tensor([r[:5] for r in hb]), rtol=0, atol=0)


def test_micro_batches_give_the_same_step_as_one_batch(tiny_teacher, tmp_path):
    one = distill(_cfg(tiny_teacher, tmp_path / "one", steps=2, max_batch_tokens=100000), progress=False)
    split = distill(_cfg(tiny_teacher, tmp_path / "split", steps=2, max_batch_tokens=300), progress=False)
    torch.testing.assert_close(torch.tensor([r[1:5] for r in one["history"]]),
                               torch.tensor([r[1:5] for r in split["history"]]), rtol=1e-4, atol=1e-6)


def test_config_file_and_overrides(tiny_teacher, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"ratio": 0.25, "temperature": 2.0, "images": "imgs"}))
    cfg = DistillConfig.from_file(path, temperature=3.0, lr=None)
    assert cfg.ratio == 0.25 and cfg.temperature == 3.0 and cfg.images == ["imgs"] and cfg.lr == 2e-4
    path.write_text(json.dumps({"ratoi": 0.25}))
    with pytest.raises(ValueError, match="unknown options ratoi"):
        DistillConfig.from_file(path)


def test_corrupt_checkpoint_on_resume_is_reported(tiny_teacher, tmp_path):
    out = tmp_path / "c"
    distill(_cfg(tiny_teacher, out), progress=False, stop_at=4)
    ckpt = list_checkpoints(tmp_path / "c.run")[-1]
    (ckpt / "state.pt").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="damaged or incomplete"):
        distill(_cfg(tiny_teacher, out), resume=True, progress=False)
    assert ckpt.exists()  # nothing already written is lost


DDP_SCRIPT = """
import json, sys
from matvlm.distill import DistillConfig, distill, end_process_group
cfg = DistillConfig(**json.loads(sys.argv[1]))
summary = distill(cfg, progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:  # one writer: lines of two processes interleave
    print("PROCESSES", dist.get_world_size() if dist.is_initialized() else 1, flush=True)
    print("HISTORY", json.dumps([row[:5] for row in summary["history"]]), flush=True)
end_process_group()  # gloo's threads outliving the interpreter abort the process at exit
"""


def test_two_processes_give_the_loss_curve_of_one(tiny_teacher, tmp_path):
    """DDP through `accelerate launch` (2 CPU processes, gloo) at the same global batch: same losses."""
    from dataclasses import asdict

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    curves = []
    for n in (1, 2):
        cfg = asdict(_cfg(tiny_teacher, tmp_path / f"out{n}", steps=3, save_every=3))
        proc = launch_on_cpu(n, [str(script), json.dumps(cfg)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"PROCESSES {n}" in proc.stdout, proc.stdout[-2000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HISTORY")][-1]
        curves.append(json.loads(line.split(" ", 1)[1]))
    # The staged recipe's alignment leaves the KL near 1e-3, where the order of sums over two processes
    # shows at ~1e-8 absolute.
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-6, atol=1e-7)


def test_demo_runs_end_to_end_and_writes_a_report(tiny_teacher, tmp_path):
    from matvlm.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), teacher=str(tiny_teacher[1]), minutes=0.01,
                                 train_records=24, test_records=9, batch_size=4))
    text = report.read_text()
    assert "held-out average (9 records)" in text and "cache per sequence at 32,768 tokens" in text
    data = json.loads((report.parent / "report.json").read_text())
    assert set(data["scores"]) == {"teacher", "hybrid"} and data["steps"] >= 4
    before, after = data["cache"]["32768"]
    assert after < before  # half the layers are mixers in this 4-layer teacher at 25%: one fewer KV layer
    assert (report.parent / "demo.png").stat().st_size > 10_000
    assert load_vlm(report.parent / "hybrid").config.mamba_layers == [0]


def test_distill_command_line(tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from matvlm.cli import app

    world, teacher = tiny_teacher
    out = tmp_path / "cli_hybrid"
    args = ["distill", "--teacher", str(teacher), "--data", str(world / "train.json"), "--out", str(out),
            "--ratio", "0.5", "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--kl-positions", "answer",
            "--layer-loss", "frobenius", "--no-train-connector"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "distill_config.json").read_text())
    assert saved["kl_positions"] == "answer" and saved["layer_loss"] == "frobenius" and not saved["train_connector"]
    assert saved["images"] == [str(world / "images")]  # default: images/ next to the JSON
    bad = CliRunner().invoke(app, [*args[:-5], "--kl-positions", "image", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "kl_positions" in bad.output


def test_data_without_answer_tokens_is_reported_with_its_id(tiny_teacher, tmp_path):
    world, _ = tiny_teacher
    records = json.loads((world / "train.json").read_text())[:8]
    records[3]["conversations"] = records[3]["conversations"][:1]  # a question and no answer
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    with pytest.raises(Exception, match=str(records[3]["id"])):
        distill(_cfg(tiny_teacher, tmp_path / "bad_out", data=str(data), steps=2), progress=False)


def test_padding_widths_to_a_multiple_changes_nothing(tiny_teacher, tmp_path):
    exact = distill(_cfg(tiny_teacher, tmp_path / "exact", steps=2, pad_to_multiple=1), progress=False)
    padded = distill(_cfg(tiny_teacher, tmp_path / "padded", steps=2, pad_to_multiple=64, max_batch_tokens=900),
                     progress=False)
    torch.testing.assert_close(torch.tensor([r[1:5] for r in exact["history"]]),
                               torch.tensor([r[1:5] for r in padded["history"]]), rtol=1e-4, atol=1e-6)
    assert [r[7] for r in exact["history"]] == [r[7] for r in padded["history"]]  # tokens count real ones only


def test_layer_loss_alone_leaves_the_connector_frozen(teacher):
    d = Distiller(teacher, to_hybrid(teacher, ratio=0.5), LossSettings(alpha_layer=1.0, beta_kl=0.0, gamma_ce=0.0))
    assert not d.train_connector
    parts = d(**_batch(teacher.config))
    parts["layer"].backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)  # no trained tensor without a gradient


def test_held_out_evaluation_runs_on_bf16_frozen_and_fp32_trained_weights(tiny_teacher):
    """The trainer on a GPU holds frozen weights in bf16 and the trained ones (connector, mixers) in fp32:
    its held-out evaluation must run under the training autocast (it failed there once, on 2 GPUs)."""
    from matvlm.data.llava import load_records
    from matvlm.distill.trainer import _evaluate
    from matvlm.io import load_processor

    world, path = tiny_teacher
    teacher = load_vlm(path, dtype=torch.bfloat16)
    distiller = Distiller(teacher, to_hybrid(teacher, ratio=0.5), LossSettings())
    for module in distiller.trainable_modules():
        module.float()
    records, images = load_records(world / "test.json")[:3], [str(world / "images")]
    processor = load_processor(path)
    with pytest.raises(RuntimeError, match="dtype"):  # why the autocast is needed
        _evaluate(distiller, processor, records, images, "phi", torch.autocast("cpu", enabled=False))
    res = _evaluate(distiller, processor, records, images, "phi", torch.autocast("cpu", dtype=torch.bfloat16))
    assert 0.0 <= res["average"] <= 1.0 and res["families"]


@pytest.mark.slow
def test_compiled_layers_give_the_eager_losses_and_the_same_checkpoint_keys(tiny_teacher, tmp_path):
    eager = distill(_cfg(tiny_teacher, tmp_path / "eager", steps=3, save_every=3), progress=False)
    compiled = distill(_cfg(tiny_teacher, tmp_path / "compiled", steps=3, save_every=3, compile_layers=True),
                       progress=False)
    torch.testing.assert_close(torch.tensor([r[1:5] for r in compiled["history"]]),
                               torch.tensor([r[1:5] for r in eager["history"]]), rtol=1e-4, atol=1e-5)
    a, b = load_vlm(tmp_path / "eager").state_dict(), load_vlm(tmp_path / "compiled").state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
