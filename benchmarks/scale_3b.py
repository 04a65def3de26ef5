"""The paper's scale on one GPU, random weights: a TinyLLaVA-Phi-2-SigLIP-3.1B-shaped teacher, converted at
25% and distilled at 1,428 tokens (728 image tokens), batch 1, bf16.

    python benchmarks/scale_3b.py --out scale_3b.json [--steps 12] [--ratio 0.25]

Reports: build and conversion time and peak memory, then per distillation step (after warm-up) the time,
tokens/s, peak memory, model FLOPs utilisation and the projected time of one epoch of the 665k-record mix
(mean length measured by the LLaVA-665K/ShareGPT4V mix is not available here: the projection uses the
paper's maximum of 1,428 tokens per record, an upper bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import LlavaForConditionalGeneration

from matvlm.model import kernels
from matvlm.bench import tinyllava_3b_config
from matvlm.model.convert import to_hybrid
from matvlm.distill import Distiller, LossSettings

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM datasheet, dense bf16
EPOCH_RECORDS = 665_000


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=1428)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    p.add_argument("--logit-impl", choices=["chunked", "liger"], default="chunked", help="KL/CE through the chunked torch path or liger's fused kernels")
    p.add_argument("--compile-layers", action="store_true",
                   help="torch.compile each decoder layer and the vision tower (fuses the element-wise work around the matmuls)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile-layers (e.g. reduce-overhead)")
    args = p.parse_args()
    dev = torch.device("cuda")
    report: dict = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "scan_backend": kernels.scan_backend("cuda"), "dtype": "bfloat16",
                    "batch": args.batch, "tokens": args.tokens, "image_tokens": 728, "ratio": args.ratio,
                    "logit_impl": args.logit_impl, "compile_layers": args.compile_layers,
                    "compile_mode": args.compile_mode}

    torch.manual_seed(0)  # the same random weights and data in every run: their losses compare
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    config = tinyllava_3b_config()
    with torch.device(dev):
        teacher = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    torch.cuda.synchronize()
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    report["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    report["teacher_lm_params"] = sum(p.numel() for p in teacher.model.language_model.parameters()) + teacher.lm_head.weight.numel()

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    student = to_hybrid(teacher, ratio=args.ratio)
    torch.cuda.synchronize()
    report["convert_seconds"] = round(time.perf_counter() - t0, 2)
    report["convert_peak_extra_gib"] = gib(torch.cuda.max_memory_allocated() - before)
    report["mixer_layers"] = student.config.mamba_layers

    distiller = Distiller(teacher, student, LossSettings(gamma_ce=0.0, logit_impl=args.logit_impl), train_connector=True)
    del teacher
    for m in distiller.trainable_modules():
        m.float()
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile_layers:  # the teacher pass's swapped-in attention modules give each layer a second graph
        student.compile_layers(mode=args.compile_mode)
    distiller.train()
    torch.cuda.empty_cache()
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    report["trainable_params"] = n_train
    report["weights_gib_after_sharing"] = gib(torch.cuda.memory_allocated())
    opt = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01, foreach=True)

    L = args.tokens
    B = args.batch
    ids = torch.randint(0, 50000, (B, L), device=dev)
    ids[:, 1:729] = config.image_token_index
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :1000] = -100
    pixels = torch.randn(B, 3, 384, 384, device=dev)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = distiller(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)
            loss = parts["layer"] / (B * L) + parts["kl"] / (B * L)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # Same seed, same data: the loss sequence of every variant (eager / compiled, chunked / liger) should agree.
    losses = [step() for _ in range(args.warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    report["losses"] = [round(float(x), 6) for x in losses]

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table)
        report["profile_top_kernels"] = table.splitlines()[:30]

    n_lm = report["teacher_lm_params"]
    n_vis = sum(p.numel() for p in student.model.vision_tower.parameters())
    n_mixer = sum(sum(p.numel() for p in m.parameters()) for m in student.mixers().values())
    n_mixer_layers = sum(sum(p.numel() for p in student.model.language_model.layers[i].parameters())
                         for i in student.config.mamba_layers)
    # Matmul FLOPs per token: teacher forward, student forward, activation gradients through the LM,
    # weight gradients of the mixers, the layer-loss pass (forward + backward of the mixer layers),
    # the vision tower once per image (729 patches for 1,428 tokens).
    flops = 2 * n_lm + 2 * n_lm + 2 * n_lm + 2 * n_mixer + 6 * n_mixer_layers + 2 * n_vis * 729 / L
    report.update(
        step_seconds=round(seconds, 4),
        tokens_per_second=round(B * L / seconds, 1),
        peak_memory_gib=gib(torch.cuda.max_memory_allocated()),
        peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
        model_gflop_per_token=round(flops / 1e9, 2),
        mfu=round(flops * B * L / seconds / H100_BF16_DENSE_FLOPS, 3),
        projected_epoch_hours_at_1428_tokens=round(EPOCH_RECORDS * seconds / B / 3600, 2),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
