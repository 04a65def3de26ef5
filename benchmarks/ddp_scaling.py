"""Distillation throughput on N processes (DDP through accelerate) against one, at the same global batch.

    accelerate launch --num_processes N benchmarks/ddp_scaling.py --out ddp_N.json [--shape tinyllava-3b|tiny]
        [--global-batch 8] [--micro-batch B] [--tokens 1428] [--steps 10] [--warmup 3] [--ratio 0.25]
        [--gradient-checkpointing]
    python benchmarks/ddp_scaling.py --compare ddp_1.json ddp_2.json --out ddp_scaling.json

On the CPU (gloo): ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... --shape tiny
(`accelerate launch --cpu` starts a single process whatever --num_processes says).

Every process builds the same random teacher (same seed), converts it (`to_hybrid`) and wraps teacher + student
in a `Distiller`, as benchmarks/scale_3b.py does; the Distiller and AdamW (trainable parameters only) go through
`accelerator.prepare`. Each step, process r takes rows [r*b, (r+1)*b) of a global batch generated from
(step, row) alone, so a 1-process and an N-process run see the same data and give the same losses. Each
process may split its b rows into micro-batches (`--micro-batch`, gradients accumulated without a DDP sync):
the 3B shape at 8 x 1,428 tokens does not fit one 80 GB card in one pass, 4 does (51 GiB).

Loss: (layer + kl) summed over the global batch, divided by its tokens, as scale_3b.py; each process scales its
part by the process count because DDP averages gradients. `--compare` gives the scaling factor (global tokens/s
of the larger run over the smaller) and the largest relative difference between the two loss sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from matvlm.model import kernels
from matvlm.bench.common import build_teacher
from matvlm.model.convert import to_hybrid
from matvlm.distill import Distiller, LossSettings
from matvlm.training import end_process_group

SEED = 0


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def make_rows(config, step: int, rows: range, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows `rows` of step `step`'s global batch; each row depends only on (step, row index)."""
    n_img, image_id = config.image_seq_length, config.image_token_index
    high = min(config.text_config.vocab_size, image_id)  # text ids never collide with the image token
    size = config.vision_config.image_size
    if tokens < n_img + 2:
        raise ValueError(f"--tokens must exceed the {n_img} image tokens + 1")
    ids, pixels = [], []
    for g in rows:
        gen = torch.Generator().manual_seed(1_000_003 * (step + 1) + g)
        row = torch.randint(0, high, (tokens,), generator=gen)
        row[1 : 1 + n_img] = image_id
        ids.append(row)
        pixels.append(torch.randn(3, size, size, generator=gen))
    input_ids = torch.stack(ids)
    labels = input_ids.clone()
    labels[:, : 1 + n_img] = -100  # prompt = BOS slot + image; only the CE (weight 0 here) reads labels
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "pixel_values": torch.stack(pixels)}
    return {k: v.to(device) for k, v in batch.items()}


def run(args: argparse.Namespace) -> None:
    accelerator = Accelerator()
    device, n_proc, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    on_gpu = device.type == "cuda"
    if args.global_batch % n_proc:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {n_proc} processes")
    b = args.global_batch // n_proc
    micro = args.micro_batch or b
    if b % micro:
        raise SystemExit(f"--micro-batch {micro} does not divide the per-process batch {b}")

    dtype = torch.bfloat16 if on_gpu else torch.float32
    teacher = build_teacher(args.shape, device, dtype, seed=SEED)
    config = teacher.config
    student = to_hybrid(teacher, ratio=args.ratio)
    distiller = Distiller(teacher, student, LossSettings(gamma_ce=0.0), train_connector=True)  # times KL + layer, as scale_3b.py does
    del teacher  # the distiller keeps what it needs; the rest is shared with the student
    for m in distiller.trainable_modules():
        m.float()  # fp32 master weights; autocast runs the matmuls in bf16
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    distiller.train()
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01, foreach=on_gpu)
    model, opt = accelerator.prepare(distiller, opt)
    if on_gpu:
        torch.cuda.empty_cache()

    L, B = args.tokens, args.global_batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)

    # All inputs are made up front and kept on the device: data generation is not part of the timed step.
    starts = range(rank * b, (rank + 1) * b, micro)
    data = [[make_rows(config, i, range(s, s + micro), L, device) for s in starts]
            for i in range(args.warmup + args.steps)]

    def step(i: int) -> torch.Tensor:
        """One optimizer step; returns this process's (layer + kl) sum, not yet synchronised with the host."""
        local = torch.zeros((), device=device, dtype=torch.float64)
        for k, chunk in enumerate(data[i]):
            with accelerator.no_sync(model) if k < len(data[i]) - 1 else nullcontext(), autocast:
                parts = model(**chunk)
                total = parts["layer"] + parts["kl"]
                loss = total / (B * L) * n_proc  # DDP averages over processes: undo it
            accelerator.backward(loss)
            local += total.detach().double()
        accelerator.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return local

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()

    warm = [step(i) for i in range(args.warmup)]
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timed = [step(args.warmup + i) for i in range(args.steps)]
    sync()
    seconds = (time.perf_counter() - t0) / args.steps

    # One reduction after the clock stops: no host sync inside the timed steps.
    losses = (accelerator.reduce(torch.stack(warm + timed), "sum") / (B * L)).tolist()
    names = gather_object([torch.cuda.get_device_name(device) if on_gpu else "cpu"])
    peaks = gather_object([gib(torch.cuda.max_memory_allocated(device)) if on_gpu else None])
    if not accelerator.is_main_process:
        return
    report = {
        "command": f"accelerate launch --num_processes {n_proc} " + " ".join(sys.argv),
        "devices": names, "torch": torch.__version__, "scan_backend": kernels.scan_backend(device.type),
        "dtype": str(dtype).removeprefix("torch."), "shape": args.shape, "ratio": args.ratio,
        "num_processes": n_proc, "global_batch": B, "per_process_batch": b, "micro_batch": micro,
        "tokens": L, "image_tokens": config.image_seq_length, "warmup": args.warmup, "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_seconds": round(seconds, 4), "tokens_per_second": round(B * L / seconds, 1),
        "peak_memory_gib_per_process": peaks,
        "warmup_losses": losses[: args.warmup], "losses": losses[args.warmup :],
    }
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


def compare(path_a: str, path_b: str, out: str) -> dict:
    """Scaling factor and loss agreement of two results at the same global batch (order does not matter)."""
    one, many = sorted((json.loads(Path(p).read_text()) for p in (path_a, path_b)), key=lambda r: r["num_processes"])
    for key in ("shape", "global_batch", "tokens", "ratio", "steps", "warmup"):
        if one[key] != many[key]:
            raise SystemExit(f"the two runs differ in {key}: {one[key]} vs {many[key]}")
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(one["losses"], many["losses"], strict=True)]
    result = {
        "runs": [path_a, path_b], "devices": [one["devices"], many["devices"]],
        "num_processes": [one["num_processes"], many["num_processes"]],
        "global_batch": one["global_batch"], "tokens": one["tokens"], "shape": one["shape"],
        "tokens_per_second": [one["tokens_per_second"], many["tokens_per_second"]],
        "step_seconds": [one["step_seconds"], many["step_seconds"]],
        "scaling": round(many["tokens_per_second"] / one["tokens_per_second"], 3),
        "ideal_scaling": many["num_processes"] / one["num_processes"],
        "max_rel_loss_diff": max(rel),
    }
    print(json.dumps(result, indent=2))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two results; no launch needed")
    p.add_argument("--shape", choices=("tinyllava-3b", "tiny"), default="tinyllava-3b")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward (default: the per-process batch)")
    p.add_argument("--tokens", type=int, default=1428)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare, args.out)
    else:
        run(args)
        end_process_group()


if __name__ == "__main__":
    main()
