"""Stage 1 of staged distillation: align each mixer to the attention it replaced, on the teacher's activations.

Per batch, the teacher runs forward (no grad) and forward hooks record, for every mixer layer i, the input
of its attention sublayer (the decoder layer's normed hidden states: Phi's parallel block and Llama's
sequential one both feed `self_attn` the output of `input_layernorm`) and that attention's output. Each
mixer then runs on the recorded input alone and is trained to reproduce the recorded output (per-token
MSE). Only the mixers run forward and backward, and the teacher's forward stops after the last mixer
layer, so a step costs a fraction of an end-to-end distillation step (MOHAWK / RADLADS-style alignment).
All mixer layers train at once: their losses are independent, one optimizer covers them all.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from matvlm.model.mixer import Mamba2Mixer
from matvlm.training import EpochOrder, lr_factor, micro_batches
from matvlm.distill.losses import layer_loss


class _Stop(Exception):
    """Raised by the hook of the last layer needed: the rest of the teacher's forward is not run."""


@dataclass
class AlignStats:
    steps: int = 0
    tokens: int = 0  # valid (non-pad) tokens of the batches the teacher ran on
    seconds: float = 0.0
    # Per layer, MSE of the mixer's output divided by the mean square of the attention's output (0 = exact),
    # averaged over the first and the last tenth of the steps.
    relative_loss_start: dict[int, float] = field(default_factory=dict)
    relative_loss_end: dict[int, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # mean relative loss over layers, per step

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_loss_start"] = {str(k): v for k, v in self.relative_loss_start.items()}
        d["relative_loss_end"] = {str(k): v for k, v in self.relative_loss_end.items()}
        return d


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.language_model.layers


@contextmanager
def capture_attention_io(model: nn.Module, layers: list[int], stop_early: bool = True) -> Iterator[dict[int, dict]]:
    """Record {"input", "output"} of `self_attn` of each decoder layer in `layers` during a forward.

    With `stop_early`, the forward raises an internal exception after the last of those layers; run it
    through `run_captured` (which swallows it)."""
    seen: dict[int, dict] = {}
    handles = []
    last = max(layers)
    for i in layers:
        attn = decoder_layers(model)[i].self_attn

        def pre(module, args, kwargs, i=i):
            seen[i] = {"input": args[0] if args else kwargs["hidden_states"]}

        def post(module, args, kwargs, output, i=i):
            seen[i]["output"] = output[0] if isinstance(output, tuple) else output
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                seen[i]["weights"] = output[1]
            if stop_early and i == last:
                raise _Stop

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.register_forward_hook(post, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_captured(model: nn.Module, batch: Mapping[str, Any]) -> None:
    """The decoder forward of a Llava model (no lm_head) on a collated batch; tolerates an early stop."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(model.dtype)
    try:
        model.model(**kwargs)
    except _Stop:
        pass


@contextmanager
def teacher_model(teacher: nn.Module) -> Iterator[nn.Module]:
    """The model that computes the teacher's activations: a Llava teacher itself, or, for a `Distiller`
    (which keeps only what differs from the student), the student with the teacher's attention layers
    and connector swapped back in."""
    if not hasattr(teacher, "teacher_attention_in_place"):
        yield teacher
        return
    student = teacher.student
    projector = student.model.multi_modal_projector
    with teacher.teacher_attention_in_place():
        if teacher.teacher_projector is not None:
            student.model.multi_modal_projector = teacher.teacher_projector
        try:
            yield student
        finally:
            student.model.multi_modal_projector = projector


def infinite_batches(dataset: Dataset, collate, batch_size: int, seed: int = 0, num_workers: int = 0) -> Iterator[dict]:
    """Batches of `dataset` for `align_mixers`, epoch after epoch: length-grouped shuffles when the data set
    knows its lengths (a padded batch costs its longest record: one long recall record among short
    ones multiplies a step's cost), else plain shuffles."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None and len(lengths) >= batch_size:
        order = EpochOrder(list(lengths), batch_size, seed)
        loader = DataLoader(dataset, batch_sampler=(idx for _, idx in order.iterate()), collate_fn=collate,
                            num_workers=num_workers)
        yield from loader
        return
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=gen),
                        collate_fn=collate, num_workers=num_workers)
    while True:
        yield from loader


def align_mixers(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    steps: int,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    grad_clip: float = 1.0,
    bf16: bool = False,
    max_batch_tokens: int = 0,
    progress: bool = False,
) -> AlignStats:
    """Train every mixer of `student` to reproduce the attention it replaced, on the teacher's activations.

    teacher: the all-attention Llava (or a `Distiller` holding the student and the teacher's differing parts);
    student: the hybrid, whose `mixers()` are trained in place (nothing else is touched);
    batches: collated batches (input_ids, attention_mask, optional pixel_values); at most `steps` are read.
    A cosine schedule with warmup (floor 10% of `lr`). `max_batch_tokens` > 0 splits a batch of long
    records into row chunks (gradients accumulate; the step is the same). Returns losses and costs.
    """
    if steps < 1:
        raise ValueError(f"align steps must be >= 1, got {steps}")
    mixers: dict[int, Mamba2Mixer] = dict(student.mixers())  # before any swap: these are the modules that train
    if not mixers:
        raise ValueError("the student has no mixer layers to align")
    layers = sorted(mixers)
    params = [p for m in mixers.values() for p in m.parameters()]
    was_training = {i: m.training for i, m in mixers.items()}
    grad_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    stats = AlignStats()
    per_layer: list[dict[int, float]] = []
    began = time.perf_counter()
    it = iter(batches)
    try:
        for m in mixers.values():
            m.train()
        for step in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                break
            n_valid = batch["attention_mask"].sum().clamp_min(1).to(device)
            chunks = micro_batches(batch, max_batch_tokens) if max_batch_tokens else [batch]
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup, shape="cosine")
            err = {i: 0.0 for i in layers}
            power = {i: 0.0 for i in layers}
            for chunk in chunks:
                chunk = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
                with torch.no_grad(), teacher_model(teacher) as t, autocast:
                    with capture_attention_io(t, layers) as seen:
                        run_captured(t, chunk)
                valid = chunk["attention_mask"].bool()
                # Mixers need the padding mask only where pads are present (left padding would enter the state).
                pad_mask = None if bool(valid.all()) else chunk["attention_mask"]
                with autocast:
                    loss = torch.zeros((), device=device)
                    for i in layers:
                        target = seen[i]["output"]
                        out, _ = mixers[i](seen[i]["input"], mixer_padding_mask=pad_mask)
                        mse = layer_loss(out, target, valid, "mse") / n_valid
                        loss = loss + mse
                        err[i] += float(mse.detach())
                        power[i] += float((target.float().pow(2).mean(-1) * valid).sum() / n_valid)
                loss.backward()
                stats.tokens += int(valid.sum())
            rel = {i: err[i] / max(power[i], 1e-12) for i in layers}
            total = sum(rel.values())
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(total):
                raise FloatingPointError(f"alignment loss became {total} at step {step + 1}; lower the align lr (now {lr})")
            per_layer.append(rel)
            stats.history.append(total / len(layers))
            stats.steps += 1
            if progress and (step + 1) % max(1, steps // 10) == 0:
                print(f"align step {step + 1}/{steps}: relative layer loss {stats.history[-1]:.4f}", flush=True)
    finally:
        for i, m in mixers.items():
            m.train(was_training[i])
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
    stats.seconds = time.perf_counter() - began
    if per_layer:
        tenth = max(1, len(per_layer) // 10)
        stats.relative_loss_start = {i: sum(r[i] for r in per_layer[:tenth]) / tenth for i in layers}
        stats.relative_loss_end = {i: sum(r[i] for r in per_layer[-tenth:]) / tenth for i in layers}
    return stats


@torch.no_grad()
def relative_layer_loss(teacher: nn.Module, student: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Per mixer layer, MSE of mixer vs attention output over the mean square of the attention output, on
    `batches` (no training): how far each mixer is from the attention it replaced."""
    mixers = dict(student.mixers())
    layers = sorted(mixers)
    err = {i: 0.0 for i in layers}
    power = {i: 0.0 for i in layers}
    for batch in batches:
        device = next(iter(mixers.values())).in_proj.weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with teacher_model(teacher) as t, capture_attention_io(t, layers) as seen:
            run_captured(t, batch)
        valid = batch["attention_mask"].bool()
        pad_mask = None if bool(valid.all()) else batch["attention_mask"]
        for i in layers:
            out, _ = mixers[i](seen[i]["input"], mixer_padding_mask=pad_mask)
            err[i] += float(layer_loss(out, seen[i]["output"], valid, "mse"))
            power[i] += float((seen[i]["output"].float().pow(2).mean(-1) * valid).sum())
    return {i: err[i] / max(power[i], 1e-12) for i in layers}


def run_align_stage(cfg, distiller: nn.Module, dataset: Dataset, pad_token_id: int, total_steps: int, bf16: bool,
                    sharded: bool, progress: bool) -> dict[str, Any]:
    """Stage 1 inside `matvlm distill` (cfg: a DistillConfig): `cfg.align_steps` steps (0: a tenth of the
    end-to-end steps) at `cfg.align_lr` on shuffled training batches. Every process runs the same batches
    from the same seed, so DDP replicas stay identical. Returns the stage's stats as a dict."""
    from functools import partial

    from matvlm.data.llava import collate

    if sharded:  # FSDP2 (any process count, so that 1 and N processes train alike): no alignment on shards yet
        print("recipe staged: the alignment stage does not run under FSDP2 sharding; distilling end to end only")
        return {"skipped": "fsdp2"}
    steps = cfg.align_steps or max(1, total_steps // 10)
    pad = partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=cfg.pad_to_multiple)
    batches = infinite_batches(dataset, pad, cfg.batch_size, seed=cfg.seed + 1, num_workers=min(cfg.num_workers, 2))
    stats = align_mixers(distiller, distiller.student, batches, steps, cfg.align_lr, bf16=bf16,
                         max_batch_tokens=cfg.max_batch_tokens, progress=progress)
    batches.close()
    if progress:
        end = ", ".join(f"{i}: {v:.3f}" for i, v in stats.relative_loss_end.items())
        print(f"aligned mixers in {stats.steps} steps ({stats.tokens:,} tokens, {stats.seconds:.0f} s); "
              f"relative layer loss {end}", flush=True)
    return stats.to_dict()
