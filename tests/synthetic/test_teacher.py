"""The teacher trainer on a tiny world: the loss falls, an interrupted run resumes exactly, output loads."""

import ast
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from matvlm.synthetic.world import generate_world
from matvlm.data.llava import load_records
from matvlm.data.tokenizer import train_tokenizer
from matvlm.synthetic.teacher import (TeacherConfig, build_teacher, curriculum_order, sdpa_choice, teacher_param_groups,
                                     train_teacher)
from matvlm.training import list_checkpoints, load_checkpoint

from ..conftest import launch_on_cpu


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(out, n_train=48, n_test=9, seed=3, image_size=64)
    return out


def tiny_cfg(world, out, **kw):
    base = dict(
        data=str(world), out=str(out), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32, vision_layers=2,
        vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64, max_length=1024, batch_size=4, steps=8,
        lr=3e-3, warmup=0.1, eval_every=0, save_every=4, num_workers=0, final_eval_records=3,
    )
    base.update(kw)
    return TeacherConfig(**base)


def history(out):
    """The log rows (step, loss, grad_norm, lr, tokens, seconds) of the run's last checkpoint."""
    meta = json.loads((list_checkpoints(out.with_name(out.name + ".run"))[-1] / "meta.json").read_text())
    return meta["history"]


def exact(rows):
    """Everything but the wall-clock seconds: what must be the same, bit for bit, in a repeated run."""
    return torch.tensor([row[:5] for row in rows], dtype=torch.float64)


def test_loss_falls_and_output_is_a_standard_llava(world, tmp_path):
    out = tmp_path / "teacher"
    results = train_teacher(tiny_cfg(world, out, steps=32, save_every=32), progress=False)
    losses = [row[1] for row in history(out)]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert set(results["families"]) <= {"attribute", "count", "spatial", "ocr", "presence", "mc", "caption",
                                        "multiturn", "recall"}
    model = LlavaForConditionalGeneration.from_pretrained(out)  # stock transformers, no matvlm class
    assert model.config.model_type == "llava" and model.config.text_config.model_type == "phi"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert AutoImageProcessor.from_pretrained(out).size["height"] == 64
    assert AutoProcessor.from_pretrained(out).image_token == "<image>"
    scores = json.loads((out / "heldout_scores.json").read_text())
    assert scores["n"] == 3 and "average" in scores
    info = json.loads((out / "matvlm.json").read_text())
    assert info["template"] == "phi" and info["train_tokens"] > 0 and info["world"]["seed"] == 3


def test_interrupted_run_resumes_with_the_same_losses(world, tmp_path):
    straight = tmp_path / "a"
    train_teacher(tiny_cfg(world, straight), progress=False)
    resumed = tmp_path / "b"
    assert train_teacher(tiny_cfg(world, resumed), progress=False, stop_at=4) is None
    assert not resumed.exists()  # no final model from an interrupted run
    train_teacher(tiny_cfg(world, resumed), progress=False)
    a, b = history(straight), history(resumed)
    assert [row[0] for row in b] == list(range(1, 9))
    torch.testing.assert_close(exact(a), exact(b), rtol=0, atol=0)
    assert (resumed.with_name("b.run") / "log.csv").read_text().splitlines()[0] == "step,loss,grad_norm,lr,tokens,seconds"
    straight_weights, resumed_weights = (LlavaForConditionalGeneration.from_pretrained(d).state_dict() for d in (straight, resumed))
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_damaged_checkpoint_is_reported(world, tmp_path):
    out = tmp_path / "c"
    train_teacher(tiny_cfg(world, out), progress=False, stop_at=4)
    ckpt = list_checkpoints(tmp_path / "c.run")[-1]
    (ckpt / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="damaged or incomplete"):
        load_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="damaged or incomplete"):
        train_teacher(tiny_cfg(world, out), progress=False)


def test_resume_refuses_changed_options_and_fresh_start_over_checkpoints(world, tmp_path):
    out = tmp_path / "d"
    train_teacher(tiny_cfg(world, out), progress=False, stop_at=4)
    with pytest.raises(ValueError, match=r"options changed \(lr: 0.003 -> 0.001\)"):
        train_teacher(tiny_cfg(world, out, lr=1e-3), progress=False)
    with pytest.raises(FileExistsError, match="holds checkpoints"):
        train_teacher(tiny_cfg(world, out), progress=False, resume=False)
    assert train_teacher(tiny_cfg(world, out, num_workers=0, eval_every=0), progress=False) is not None


def test_preloaded_data_gives_the_same_run(world, tmp_path):
    plain, pre = tmp_path / "plain", tmp_path / "pre"
    train_teacher(tiny_cfg(world, plain, steps=4, save_every=4), progress=False)
    train_teacher(tiny_cfg(world, pre, steps=4, save_every=4, preload=True, num_workers=1), progress=False)
    torch.testing.assert_close(exact(history(plain)), exact(history(pre)), rtol=0, atol=0)


def test_curriculum_warmup_on_some_families(world, tmp_path):
    out = tmp_path / "cur"
    train_teacher(tiny_cfg(world, out, steps=4, save_every=4, warmup_families=["caption", "attribute"], warmup_steps=2,
                           family_weights={"recall": 2}), progress=False)
    assert len(history(out)) == 4
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_teacher(tiny_cfg(world, tmp_path / "none", warmup_families=["nope"], warmup_steps=2), progress=False)


def test_family_weights_repeat_records_of_a_family(world):
    from matvlm.synthetic.teacher import mixed_order

    records = load_records(Path(world) / "train.json")
    lengths = [10] * len(records)
    cfg = TeacherConfig(data=world, out="unused", batch_size=4, family_weights={"recall": 3, "caption": 0})
    order = mixed_order(records, lengths, cfg)
    epoch = [order.indices[j] for batch in order.order.epoch_batches(0) for j in batch]
    counts = Counter(records[i]["family"] for i in epoch)
    n = Counter(r["family"] for r in records)
    assert "caption" not in counts
    assert sum(counts.values()) == (len(records) - n["caption"] + 2 * n["recall"]) // 4 * 4
    assert counts["recall"] >= 3 * n["recall"] - 4 and counts["attribute"] <= n["attribute"]
    with pytest.raises(ValueError, match="no training record"):
        mixed_order(records, lengths, TeacherConfig(data=world, out="unused", batch_size=4, family_weights={"nope": 2}))
    with pytest.raises(ValueError, match="whole number"):
        mixed_order(records, lengths, TeacherConfig(data=world, out="unused", batch_size=4, family_weights={"recall": 1.5}))


def test_curriculum_stages_pick_their_records_in_order(world):
    from matvlm.data.llava import record_words as _words

    records = load_records(Path(world) / "train.json")
    short = sorted(_words(r) for r in records)[len(records) // 2]
    cfg = TeacherConfig(data=world, out="unused", batch_size=4, warmup_families=["caption"], warmup_steps=2,
                        stages=[{"steps": 3, "max_words": short}, {"steps": 1, "families": ["attribute", "count"]}])
    batches = [b for _, b in zip(range(8), curriculum_order(records, [10] * len(records), cfg).iterate(0))]
    assert [n for n, _ in batches] == list(range(8))
    fam = [[records[i]["family"] for i in b] for _, b in batches]
    assert all(f == "caption" for f in fam[0] + fam[1])
    assert all(_words(records[i]) <= short for _, b in batches[2:5] for i in b)
    assert set(fam[5]) <= {"attribute", "count"}
    resumed = [b for _, b in zip(range(4), curriculum_order(records, [10] * len(records), cfg).iterate(4))]
    assert resumed == batches[4:8]  # batch k is the same whether the run started at 0 or resumed
    for bad in ({"steps": 0}, {"steps": 2, "famlies": ["caption"]}, {"steps": 2, "max_words": 0}):
        with pytest.raises(ValueError, match="stage"):
            curriculum_order(records, [10] * len(records), TeacherConfig(data=world, out="u", batch_size=4, stages=[bad]))


def test_export_of_an_unfinished_run_from_checkpoint_or_weights_file(world, tmp_path):
    from safetensors.torch import save_file

    from matvlm.synthetic.teacher import export_teacher

    out = tmp_path / "e"
    train_teacher(tiny_cfg(world, out), progress=False, stop_at=4)
    run_dir = tmp_path / "e.run"
    results = export_teacher(run_dir, tmp_path / "from_ckpt", progress=False)
    info = json.loads((tmp_path / "from_ckpt" / "matvlm.json").read_text())
    assert info["train_steps"] == 4 and "before its end" in info["note"] and results["n"] == 3
    tensors, _, _ = load_checkpoint(list_checkpoints(run_dir)[-1])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "from_ckpt")
    key = "model.language_model.embed_tokens.weight"
    torch.testing.assert_close(model.state_dict()[key].float(), tensors[key].to(torch.bfloat16).float())

    weights = tmp_path / "w.safetensors"  # as brought back from another machine: weights only, bf16
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(weights), metadata={"step": "4"})
    export_teacher(run_dir, tmp_path / "from_file", weights=weights, progress=False)
    assert json.loads((tmp_path / "from_file" / "matvlm.json").read_text())["train_steps"] == 4
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(weights), metadata={"step": "8"})
    export_teacher(run_dir, tmp_path / "last", weights=weights, progress=False)  # the run's last step (steps=8)
    assert "its last step" in json.loads((tmp_path / "last" / "matvlm.json").read_text())["note"]
    del tensors[key]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    with pytest.raises(ValueError, match="missing"):
        export_teacher(run_dir, tmp_path / "bad", weights=weights, progress=False)
    with pytest.raises(FileNotFoundError, match="teacher run folder"):
        export_teacher(tmp_path, tmp_path / "bad", progress=False)


def test_init_from_an_existing_teacher(world, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train_teacher(tiny_cfg(world, first, save_dtype="float32"), progress=False)
    again = tmp_path / "again"  # lr 0: the weights must come through unchanged
    train_teacher(tiny_cfg(world, again, init_from=str(first), lr=0.0, save_dtype="float32"), progress=False)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(again)[0][1] < history(first)[0][1]  # starts from the trained loss, not from scratch
    info_first, info_again = (json.loads((d / "matvlm.json").read_text()) for d in (first, again))
    assert info_again["train_tokens_total"] == info_first["train_tokens"] + info_again["train_tokens"]
    assert info_again["train_steps_total"] == 2 * info_first["train_steps"]
    with pytest.raises(ValueError, match="does not fit this config"):
        train_teacher(tiny_cfg(world, tmp_path / "wide", init_from=str(first), hidden=48), progress=False)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_teacher(tiny_cfg(world, tmp_path / "none", init_from=str(tmp_path)), progress=False)


def test_init_from_a_teacher_of_another_tokenizer_carries_the_embeddings_over(world, tmp_path):
    """number_space from a teacher without it: a new tokenizer is trained; a token both vocabularies hold keeps
    its rows, a new one ("Ġ3") starts from the mean of the old tokens of its text ("Ġ", "3")."""
    from matvlm.data.tokenizer import keeps_number_space
    from matvlm.synthetic.teacher import transfer_vocab

    first = tmp_path / "first"
    train_teacher(tiny_cfg(world, first, steps=2, save_dtype="float32"), progress=False)
    again = tmp_path / "again"
    # digit_group 1: numbers are cut into single digits, and with room in the vocabulary BPE learns spaced ones ("Ġ3")
    train_teacher(tiny_cfg(world, again, steps=2, init_from=str(first), number_space=True, digit_group=1,
                           vocab_size=1000, lr=0.0, save_dtype="float32"), progress=False)
    old_tok, new_tok = AutoTokenizer.from_pretrained(first), AutoTokenizer.from_pretrained(again)
    assert not keeps_number_space(old_tok) and keeps_number_space(new_tok)
    old, new = (LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32) for d in (first, again))
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    spaced = [t for t in new_vocab if t.startswith("Ġ") and t[1:].isdigit() and t not in old_vocab]
    assert spaced and all(len(t) == 2 for t in spaced)  # "Ġ" and one digit
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.lm_head.weight):
        w_old, w_new = get(old).detach(), get(new).detach()
        for token in ("Ġthe", "<image>", old_tok.eos_token):
            torch.testing.assert_close(w_new[new_vocab[token]], w_old[old_vocab[token]])
        parts = old_tok.encode(new_tok.convert_tokens_to_string([spaced[0]]), add_special_tokens=False)
        assert len(parts) >= 2 and old_tok.convert_ids_to_tokens(parts[0]) == "Ġ"
        torch.testing.assert_close(w_new[new_vocab[spaced[0]]], w_old[parts].mean(0))
    tensors = {"lm_head.weight": torch.zeros(len(old_tok), 4), "other.weight": torch.zeros(len(old_tok), 4)}
    assert transfer_vocab(tensors, old_tok, new_tok) == ["lm_head.weight"]
    # Continued without naming number_space: the tokenizer stays the init_from teacher's, and the run says so.
    third = tmp_path / "third"
    train_teacher(tiny_cfg(world, third, steps=1, init_from=str(again)), progress=False)
    assert AutoTokenizer.from_pretrained(third).get_vocab() == new_vocab
    assert json.loads((tmp_path / "third.run" / "config.json").read_text())["number_space"] is True


def test_init_from_larger_patches_sees_a_zoomed_image(world, tmp_path):
    """A patch-8 teacher from a patch-16 one: its patch embedding of an image is the old one's of that image
    enlarged twice (nearest), the position table is resized to the finer grid, and all else is copied."""
    from matvlm.synthetic.teacher import POSITION_KEY, init_weights, resample_patches

    first = tmp_path / "p16"
    train_teacher(tiny_cfg(world, first, steps=2, save_dtype="float32"), progress=False)
    old = LlavaForConditionalGeneration.from_pretrained(first, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(first)
    new = build_teacher(tiny_cfg(world, "unused", patch_size=8), tokenizer)
    init_weights(new, first)
    assert new.config.image_seq_length == 4 * old.config.image_seq_length
    emb_old, emb_new = (m.model.vision_tower.embeddings for m in (old, new))
    x = torch.randn(2, 3, 64, 64)
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(emb_new.patch_embedding(x), emb_old.patch_embedding(big), rtol=1e-5, atol=1e-5)
    assert emb_new.position_embedding.weight.shape == (64, 32)
    corner_old, corner_new = (e.position_embedding.weight[0].detach() for e in (emb_old, emb_new))
    assert torch.allclose(corner_new, corner_old, atol=0.5 * float(corner_old.abs().max()))  # near the old corner
    flat = {"p." + POSITION_KEY: torch.ones(16, 32) * torch.arange(32.0)}  # the same table everywhere stays so
    assert resample_patches(flat, {"p." + POSITION_KEY: torch.zeros(64, 32)}) == ["p." + POSITION_KEY]
    torch.testing.assert_close(flat["p." + POSITION_KEY], torch.ones(64, 32) * torch.arange(32.0))
    a, b = old.state_dict(), new.state_dict()
    same = [k for k in a if "patch_embedding.weight" not in k and "position_embedding" not in k]
    assert all(torch.equal(a[k], b[k]) for k in same)
    odd = build_teacher(tiny_cfg(world, "unused", patch_size=6, image_size=60), tokenizer)
    with pytest.raises(ValueError, match="cannot be split"):
        init_weights(odd, first)


@pytest.mark.slow
def test_compiled_training_forward_gives_the_eager_losses(world, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_teacher(tiny_cfg(world, eager, steps=3, save_every=3), progress=False, stop_at=3)
    # Run to the end: the final evaluation generates with the layers compiled in place (forced eager).
    train_teacher(tiny_cfg(world, compiled, steps=3, save_every=3, compile=True, final_eval_records=2), progress=False)
    torch.testing.assert_close(torch.tensor(history(eager))[:, 1], torch.tensor(history(compiled))[:, 1], rtol=1e-4, atol=1e-5)
    assert json.loads((compiled / "heldout_scores.json").read_text())["n"] == 2


def test_unknown_compile_choice_is_refused(world):
    with pytest.raises(ValueError, match="compile must be true or false"):
        tiny_cfg(world, "unused", compile="model")


def test_a_window_of_steps_is_profiled_into_the_run_folder(world, tmp_path):
    out = tmp_path / "profiled"
    train_teacher(tiny_cfg(world, out, steps=3, save_every=3, profile_at=2), progress=False, stop_at=3)
    text = (out.with_name("profiled.run") / "profile.txt").read_text()
    summary = ast.literal_eval(text.splitlines()[0])
    # The window of 10 steps from step 2 is cut at the run's last step (3), so it still closes and writes.
    assert summary["steps"] == [2, 3] and summary["step_ms"] > 0
    assert "aten::" in text and "by host time" in text  # the operator table, sorted by host time on a CPU


def test_patch_learning_rate_scale_and_position_init(world, tmp_path):
    tok = train_tokenizer(["a red circle"] * 4, vocab_size=300)
    cfg = tiny_cfg(world, tmp_path / "t", patch_lr_scale=0.05, position_init_std=0.5)
    model = build_teacher(cfg, tok)
    table = model.model.vision_tower.embeddings.position_embedding.weight
    assert abs(table.std().item() - 0.5) < 0.05
    groups = teacher_param_groups(model, cfg)
    patch = {id(p) for p in model.model.vision_tower.embeddings.patch_embedding.parameters()}
    scaled = [g for g in groups if g["lr_scale"] == 0.05]
    assert {id(p) for g in scaled for p in g["params"]} == patch
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(teacher_param_groups(model, tiny_cfg(world, tmp_path / "t"))) == 2  # default: decay and no decay
    assert [g["lr_scale"] * g["weight_decay"] for g in groups if g["weight_decay"]] == pytest.approx([0.1] * 2)
    # The run uses the scaled rate, and an interrupted run with the option resumes with the same losses.
    straight, split = tmp_path / "a", tmp_path / "b"
    train_teacher(tiny_cfg(world, straight, patch_lr_scale=0.05), progress=False)
    train_teacher(tiny_cfg(world, split, patch_lr_scale=0.05), progress=False, stop_at=4)
    train_teacher(tiny_cfg(world, split, patch_lr_scale=0.05), progress=False)
    assert exact(history(straight)).tolist() == exact(history(split)).tolist()
    state = load_checkpoint(list_checkpoints(straight.with_name("a.run"))[-1])[1]["optimizer"]
    assert sorted({g["lr_scale"] for g in state["param_groups"]}) == [0.05, 1.0]


def test_attention_kernels_can_be_chosen(world, tmp_path):
    with pytest.raises(ValueError, match="sdpa_backends: unknown"):
        sdpa_choice(["fast"])
    # Only the math kernel allowed: the run trains as with PyTorch's choice (on the CPU, the same kernel).
    a, b = tmp_path / "a", tmp_path / "b"
    train_teacher(tiny_cfg(world, a, steps=4, final_eval_records=1), progress=False)
    train_teacher(tiny_cfg(world, b, steps=4, final_eval_records=1, sdpa_backends=["math"]), progress=False)
    torch.testing.assert_close(exact(history(a)), exact(history(b)), rtol=1e-5, atol=1e-6)


DDP_TEACHER = """
import json, os, sys
from matvlm.synthetic.teacher import TeacherConfig, train_teacher
results = train_teacher(TeacherConfig(**json.loads(sys.argv[1])), progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    print("PROCESSES", os.environ.get("WORLD_SIZE", "1"), "RESULTS", results is not None, flush=True)
"""


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_params_without_gradient_are_exactly_those_unused(world, feature_layer):
    from matvlm.synthetic.teacher import params_without_gradient

    tokenizer = train_tokenizer(["a b c"], vocab_size=300, template="phi")
    model = build_teacher(tiny_cfg(world, "unused", vision_feature_layer=feature_layer), tokenizer)
    n_img = model.config.image_seq_length
    ids = torch.tensor([[5] + [model.config.image_token_index] * n_img + [6, 7, 8]])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=ids).loss.backward()
    unused = {id(p) for p in params_without_gradient(model)}
    assert unused and all((p.grad is None) == (id(p) in unused) for p in model.parameters())


@pytest.mark.parametrize("feature_layer,generated", [(-1, 0), (-2, 0), (-1, 40)])
def test_two_processes_train_the_teacher_of_one(world, tmp_path, feature_layer, generated):
    """DDP through `accelerate launch` (2 CPU processes, gloo), the same global batches: same losses and weights.
    With generated records each process sizes half of them, and the gathered lengths give the same batches; they
    include plain-text repeat records, so a process's rows may hold no image (DDP finds the unused parameters)."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    script = tmp_path / "ddp_teacher.py"
    script.write_text(DDP_TEACHER)
    runs = []
    for n in (1, 2):
        out = tmp_path / f"teacher{n}"
        cfg = asdict(tiny_cfg(world, out, steps=4, save_every=4, save_dtype="float32", max_batch_tokens=300,
                              vision_feature_layer=feature_layer, generated_train=generated,
                              **(dict(train_only_families=["repeat"], family_weights={"repeat": 6}) if generated else {})))
        proc = launch_on_cpu(n, [str(script), json.dumps(cfg)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"PROCESSES {n} RESULTS True" in proc.stdout, proc.stdout[-2000:]
        runs.append((history(out), load_file(out / "model.safetensors")))
    (one, weights_one), (two, weights_two) = runs
    assert [r[0] for r in one] == [r[0] for r in two] == [1, 2, 3, 4]
    assert [r[4] for r in one] == [r[4] for r in two]  # tokens: both processes' rows counted
    # Float32 sums in another order (one process sums the CE over all rows, two sum half each and add the
    # partial sums; DDP adds the gradients the same way): the loss and gradient norm differ by a few float32 ulps
    # of their magnitude, so a relative tolerance, no absolute one. A wrong count or a missing row is off by
    # percents. The weights after 4 AdamW steps: Adam divides each gradient by its running RMS, so where a
    # gradient is ~0 a tiny difference moves a weight by up to ~lr; hence an absolute tolerance of lr / 100.
    torch.testing.assert_close(torch.tensor([r[1:3] for r in two], dtype=torch.float64),
                               torch.tensor([r[1:3] for r in one], dtype=torch.float64), rtol=1e-5, atol=0)
    for k in weights_one:
        torch.testing.assert_close(weights_two[k], weights_one[k], rtol=1e-4, atol=3e-5)


def test_host_threads_are_limited_on_a_gpu_only():
    from matvlm.synthetic.teacher import limit_host_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limit_host_threads(torch.device("cpu"), 1)
        assert torch.get_num_threads() == 2
        limit_host_threads(torch.device("cuda"), 0)
        assert torch.get_num_threads() == 2
        limit_host_threads(torch.device("cuda"), 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
