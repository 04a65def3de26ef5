"""FSDP2 distillation (torch `fully_shard`) on 2 CPU processes (gloo): the loss curve of one unsharded
process, the same trained weights in the written hybrid, and an exact resume; plus the option logic."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from matvlm.distill import distill
from matvlm.distill.sharding import Launcher, launcher_settings, resolve_sharding
from matvlm.io import load_vlm
from matvlm.training import even_micro_batches, list_checkpoints, load_checkpoint, micro_batches

from ..conftest import free_port
from .test_distill import _cfg, tiny_teacher  # noqa: F401  (the module-scoped tiny teacher fixture)

RUNS_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
import matvlm.training.loop as loop
from matvlm.distill import DistillConfig, distill, end_process_group
from matvlm.training import micro_batches

splits = [0]  # steps where a rank split its micro-batches to match the other rank's count


def counting(batch, max_tokens, multiple, count, even=loop.even_micro_batches):
    splits[0] += len(micro_batches(batch, max_tokens, multiple)) < count
    return even(batch, max_tokens, multiple, count)


loop.even_micro_batches = counting
for run in json.loads(sys.argv[1]):
    splits[0] = 0
    summary = distill(DistillConfig(**run["cfg"]), resume=run["resume"], progress=False, stop_at=run["stop_at"])
    # NCCL reduces only CUDA tensors, gloo only CPU ones
    total = torch.tensor(splits, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    if dist.get_rank() == 0:  # one writer: lines of two processes interleave
        history = [row[:6] for row in summary["history"]]
        print("HISTORY", run["name"], dist.get_world_size(), int(total), json.dumps(history), flush=True)
        print("HELDOUT", run["name"], json.dumps(summary.get("heldout")), flush=True)
end_process_group()  # gloo's threads outliving the interpreter abort the process at exit
"""


def _launch(tmp_path, runs: list[dict], fsdp_flag: bool, gpu: bool) -> dict:
    """Run `runs` one after another in 2 processes (CPU or GPU); -> history (step, loss parts, grad norm)
    per name, under NAME_splits the number of steps where a rank split its micro-batches (see RUNS_SCRIPT)
    and under NAME_heldout the held-out scores."""
    script = tmp_path / "runs.py"
    script.write_text(RUNS_SCRIPT)
    # `--use_fsdp --fsdp_version 2` is what an accelerate user types (accelerate drops its FSDP plugin on the
    # CPU, the distiller reads the launcher's environment); `--multi_gpu` + sharding=fsdp2 is the config route.
    mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp_flag else ["--multi_gpu"]  # both start 2 processes
    launch = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # not the default: other runs may hold it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not gpu:
        env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launch, str(script), json.dumps(runs)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("HISTORY"):
            _, name, world, splits, history = line.split(" ", 4)
            assert world == "2"
            out[name] = json.loads(history)
            out[name + "_splits"] = int(splits)
        if line.startswith("HELDOUT"):
            _, name, heldout = line.split(" ", 2)
            out[name + "_heldout"] = json.loads(heldout)
    assert {k for k in out if "_" not in k} == {r["name"] for r in runs}, proc.stdout[-2000:]
    return out


def _run(name, cfg, stop_at=None, resume=False) -> dict:
    return {"name": name, "cfg": asdict(cfg), "stop_at": stop_at, "resume": resume}


def test_fsdp2_on_two_processes_matches_one_unsharded_process(tiny_teacher, tmp_path):  # noqa: F811
    """2 CPU processes (gloo) against the ordinary one-process (DDP-path) run: float32, tight tolerances."""
    _check_two_processes(tiny_teacher, tmp_path, gpu=False)


@pytest.mark.gpu
def test_fsdp2_on_two_gpus_matches_one_gpu(tiny_teacher, tmp_path):  # noqa: F811
    """2 GPUs (NCCL, bf16 autocast) against one GPU with `sharding: fsdp2` (nothing to shard, but built on
    the CPU like the sharded run: CPU and GPU random generators would give the mixers different inits)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    _check_two_processes(tiny_teacher, tmp_path, gpu=True)


def test_fsdp2_on_two_processes_with_the_dtypes_of_a_gpu_run(tiny_teacher, tmp_path):  # noqa: F811
    """As on GPUs: frozen weights in bf16, trained ones in fp32, bf16 autocast (`bf16_cpu`), so that groups of
    both dtypes are gathered and reduced, and evaluation runs on the mixed model. 2 CPU processes (gloo)
    against one with `sharding: fsdp2`."""
    _check_two_processes(tiny_teacher, tmp_path, gpu=False, bf16=True)


def _check_two_processes(tiny_teacher, tmp_path, gpu: bool, bf16: bool = False) -> None:
    # Same options, one unsharded process. With a budget of 600 tokens per micro-batch, on some steps one
    # rank's two records fit in one micro-batch while the other rank's need two: the first rank then splits
    # its batch to run as many micro-batches (each gathers parameters, so the counts must agree).
    # recipe single: these runs test sharding, and the alignment stage does not run under FSDP2
    kw = dict(steps=3, save_every=2, max_batch_tokens=600, bf16_cpu=bf16, recipe="single")
    mixed = gpu or bf16  # bf16 frozen weights and matmuls: looser tolerances
    held_out = dict(eval_data=str(tiny_teacher[0] / "test.json"), eval_records=3)  # evaluated at the end
    base_run = distill(_cfg(tiny_teacher, tmp_path / "base", sharding="fsdp2" if mixed else "auto", **kw, **held_out),
                       progress=False)
    base = base_run["history"]

    first = _launch(tmp_path, [
        _run("whole", _cfg(tiny_teacher, tmp_path / "fsdp", **kw, **held_out)),
        _run("stopped", _cfg(tiny_teacher, tmp_path / "resumed", **kw), stop_at=2),
    ], fsdp_flag=True, gpu=gpu)
    # Resume in a fresh launch, through the config option instead of the launcher's flag.
    second = _launch(tmp_path, [
        _run("resumed", _cfg(tiny_teacher, tmp_path / "resumed", sharding="fsdp2", **kw), resume=True),
    ], fsdp_flag=False, gpu=gpu)

    # (a) The loss curve (loss, layer, kl, ce) and the gradient norm of one unsharded process.
    assert first["whole_splits"] > 0  # the uneven micro-batch case did happen
    whole = torch.tensor(first["whole"], dtype=torch.float64)
    curve_tol = dict(rtol=2e-3, atol=1e-5) if mixed else dict(rtol=1e-5, atol=1e-7)  # bf16 matmuls
    expected = torch.tensor([r[:6] for r in base], dtype=torch.float64)
    torch.testing.assert_close(whole[:, :5], expected[:, :5], **curve_tol)  # step, loss, layer, kl, ce
    # The gradient norm sums bf16 gradients reduced in another order when sharded: up to ~1 bf16 ulp (2^-8) apart
    # (0.46% on one step of one batch order on two H100s).
    torch.testing.assert_close(whole[:, 5], expected[:, 5], **(dict(rtol=1e-2, atol=1e-5) if mixed else curve_tol))

    # Held-out evaluation runs on both ranks (generation kept in step across them); on the CPU (float32)
    # it gives the same answers as one process.
    keys = ("average", "generated_tokens")
    assert all(k in first["whole_heldout"] for k in keys)
    if not mixed:
        assert {k: first["whole_heldout"][k] for k in keys} == {k: base_run["heldout"][k] for k in keys}

    # (c) Stopped after 2 steps and resumed in new processes: the same losses as the uninterrupted run.
    assert [r[0] for r in first["stopped"]] == [1, 2] and [r[0] for r in second["resumed"]] == [1, 2, 3]
    resume_tol = dict(rtol=1e-5, atol=1e-7) if gpu else dict(rtol=0, atol=0)  # NCCL need not be bitwise
    torch.testing.assert_close(torch.tensor(second["resumed"]), torch.tensor(first["whole"]), **resume_tol)

    # (b) The written hybrid loads with the normal model class and holds the unsharded run's weights.
    ref, fsdp, resumed = load_vlm(tmp_path / "base"), load_vlm(tmp_path / "fsdp"), load_vlm(tmp_path / "resumed")
    assert type(fsdp) is type(ref) and fsdp.config.mamba_layers == ref.config.mamba_layers
    ref_sd, fsdp_sd, resumed_sd = ref.state_dict(), fsdp.state_dict(), resumed.state_dict()
    assert fsdp_sd.keys() == ref_sd.keys()
    mixers = tuple(f"model.language_model.layers.{i}.self_attn." for i in ref.config.mamba_layers)
    trained = [k for k in ref_sd if k.startswith(mixers)]
    assert trained
    mixed_diff, mixed_norm = {"fsdp": 0.0, "resumed": 0.0}, 0.0
    for k, v in ref_sd.items():
        if k in trained or "multi_modal_projector" in k:
            if mixed:  # bf16 compute and bf16 files: close over all trained tensors, and each within 10% (a
                # misplaced shard is ~140% off). Small tensors that start near 0 can be further apart than the
                # whole: where a gradient is ~0, bf16 rounding can flip the sign of an Adam step (seen:
                # one element of a conv1d bias, 7.5% of its norm; every other tensor within 1%).
                for name, other in (("fsdp", fsdp_sd[k]), ("resumed", resumed_sd[k])):
                    diff, norm = (other.float() - v.float()).norm().item(), v.float().norm().item()
                    assert diff <= 0.1 * norm, (name, k, diff / norm)
                    mixed_diff[name] += diff ** 2
                mixed_norm += norm ** 2
            else:
                torch.testing.assert_close(fsdp_sd[k], v, rtol=1e-5, atol=1e-6, msg=k)
                assert torch.equal(resumed_sd[k], fsdp_sd[k]), k
        else:
            assert torch.equal(fsdp_sd[k], v) and torch.equal(resumed_sd[k], v), k  # frozen: bit for bit
    if mixed:
        assert max(mixed_diff.values()) <= 1e-2 ** 2 * mixed_norm, (mixed_diff, mixed_norm)
    dtypes = [json.loads((tmp_path / d / "config.json").read_text())["dtype"] for d in ("base", "fsdp")]
    assert dtypes == ["bfloat16" if mixed else "float32"] * 2

    # Checkpoints hold full tensors in the unsharded layout (a run may resume under the other sharding).
    (base_ckpt, base_state, _), (fsdp_ckpt, fsdp_state, _) = (
        load_checkpoint(list_checkpoints(tmp_path / f"{d}.run")[-1]) for d in ("base", "fsdp"))
    assert {k: v.shape for k, v in fsdp_ckpt.items()} == {k: v.shape for k, v in base_ckpt.items()}
    shapes = [{i: {k: v.shape for k, v in s["optimizer"]["state"][i].items()} for i in s["optimizer"]["state"]}
              for s in (base_state, fsdp_state)]
    assert shapes[0] == shapes[1]


# ------------------------------------------------------------------------------------------ pieces
def test_sharding_option_follows_the_launcher(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
                 "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_settings() == Launcher()
    assert resolve_sharding("auto", Launcher()) == "ddp"
    assert resolve_sharding("fsdp2", Launcher()) == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    launcher = launcher_settings()
    assert launcher == Launcher(fsdp_version=2, reshard_after_forward=False)
    assert resolve_sharding("auto", launcher) == resolve_sharding("fsdp2", launcher) == "fsdp2"
    with pytest.raises(ValueError, match="drop one of them"):
        resolve_sharding("ddp", launcher)
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        resolve_sharding("auto", Launcher(fsdp_version=1))
    with pytest.raises(ValueError, match="choose one of"):
        resolve_sharding("zero3", Launcher())
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="offload"):
        launcher_settings()


def test_even_micro_batches_split_rows_and_keep_their_images():
    lengths, width = [9, 7, 6, 3], 12
    input_ids = torch.arange(4 * width).reshape(4, width)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    has_image = torch.tensor([True, False, True, True])
    pixels = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 3, 2, 2)  # image k is filled with k
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=input_ids.clone(), has_image=has_image,
                 pixel_values=pixels)
    assert len(micro_batches(batch, 100, 1)) == 1
    chunks = even_micro_batches(batch, 100, 1, 3)
    assert [c["input_ids"].shape[0] for c in chunks] == [1, 1, 2]
    assert torch.equal(torch.cat([c["input_ids"][:, :6] for c in chunks]), input_ids[:, :6])
    assert [c["input_ids"].shape[1] for c in chunks] == [9, 7, 6]  # each trimmed to its own longest row
    assert chunks[0]["pixel_values"][:, 0, 0, 0].tolist() == [0.0]
    assert chunks[1]["pixel_values"] is None  # row 1 has no image
    assert chunks[2]["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    # each chunk's images are a view of the batch's (pinned by the loader on a GPU machine), not a copy
    assert all(c["pixel_values"] is None or c["pixel_values"].untyped_storage().data_ptr()
               == pixels.untyped_storage().data_ptr() for c in chunks)
    assert len(even_micro_batches(batch, 100, 1, 4)) == 4
    assert even_micro_batches(batch, 100, 1, 1)[0]["input_ids"].shape == (4, 9)
    with pytest.raises(RuntimeError, match="cannot split"):
        even_micro_batches(batch, 100, 1, 5)


def test_every_fsdp2_group_holds_one_dtype_as_on_a_gpu(tiny_teacher):  # noqa: F811
    """On a GPU the frozen weights are bf16 and the trained ones fp32, and FSDP2 gathers a group's
    parameters in one flat buffer: no group may mix the two. (On the CPU both are fp32, so the gloo test
    above cannot see this.)"""
    from matvlm.model.convert import to_hybrid
    from matvlm.distill import Distiller, LossSettings
    from matvlm.distill.sharding import shard_groups

    teacher = load_vlm(tiny_teacher[1], dtype=torch.bfloat16)
    distiller = Distiller(teacher, to_hybrid(teacher, ratio=0.5), LossSettings())
    for module in distiller.trainable_modules():
        module.float()
    owned: set[int] = set()
    dtypes_per_group = []
    for group in shard_groups(distiller):
        params = [p for p in group.parameters() if id(p) not in owned]
        owned |= {id(p) for p in params}
        dtypes_per_group.append({p.dtype for p in params})
        assert len(dtypes_per_group[-1]) <= 1, (type(group).__name__, dtypes_per_group[-1])
    assert owned == {id(p) for p in distiller.parameters()}  # every parameter is in some group
    assert {torch.float32} in dtypes_per_group and {torch.bfloat16} in dtypes_per_group
