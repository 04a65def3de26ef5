"""Where a decode step's time goes: kernels per step and GPU time by kind, teacher vs hybrids.

    python benchmarks/profile_decode.py --out decode_profile.json [--contexts 1024]
    python benchmarks/profile_decode.py --out OUT.json --contexts 1024,16384 --compile --no-profile

For each model (TinyLLaVA-3.1B shape, random weights, bf16): the CUDA-graph step time from
`Engine.time_decode_steps`, then one eager step under torch.profiler (graphs hide the kernels), with
kernels grouped into matmul, attention, normalisation/reductions, elementwise/copy and other.
The weight-streaming floor (decode weight bytes / measured bandwidth) says how far the step is from the
bound; the kernel count times a few microseconds is the part that fusion could remove. With --compile it
also times the step compiled by torch.compile (`Engine(compile_step=True)`) and the compile itself.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict

import torch

from matvlm.bench.common import (
    ordinary_id_range,
    build_models,
    decode_weight_bytes,
    device_name,
    measure_bandwidth,
)
from matvlm.engine import Engine

KINDS = (  # first match wins; names as cuBLAS, flash/SDPA and PyTorch's own kernels spell them
    ("matmul", ("gemm", "gemv", "cutlass", "sm90_xmma", "cublas", "nvjet", "splitk")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("norm", ("norm", "welford", "reduce")),
    ("elementwise/copy", ("elementwise", "copy", "cat", "index", "fill", "where", "vectorized", "unrolled")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_step(eng: Engine, context: int, token: int) -> dict:
    """Kernels of one eager decode step at `context`: count and GPU microseconds, by kind and top names."""
    from torch.profiler import ProfilerActivity, profile

    eng.use_cuda_graph = False  # graphs hide their kernels from the profiler: profile the eager step
    eng.time_decode_steps(1, context, 2, token, warm=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.time_decode_steps(1, context, 1, token, warm=0)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us <= 0 or ev.count == 0 or ("Memcpy" in ev.key and "DtoD" not in ev.key):
            continue
        for table, key in ((by_kind, kind_of(ev.key)), (by_name, ev.key[:90])):
            table[key][0] += ev.count
            table[key][1] += us
    eng.use_cuda_graph = True
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "kernels": int(sum(v[0] for v in by_kind.values())),
        "gpu_us": round(sum(v[1] for v in by_kind.values()), 1),
        "by_kind": {k: {"kernels": int(v[0]), "gpu_us": round(v[1], 1)} for k, v in sorted(by_kind.items())},
        "top_kernels": [{"name": k, "count": int(v[0]), "gpu_us": round(v[1], 1)} for k, v in top],
    }


def graph_step(model, context: int, steps: int, compile_step: bool) -> dict:
    token = ordinary_id_range(model)[0]
    slots = context + steps + 8
    eng = Engine(model, 1, slots, use_cuda_graph=torch.cuda.is_available(), min_kv_bucket=slots, compile_step=compile_step)
    began = time.perf_counter()
    eng.warmup(1)  # captures (and compiles) the step
    ready = time.perf_counter() - began
    seconds = eng.time_decode_steps(1, context, steps, token)
    return {"engine": eng, "step_us": round(1e6 * seconds / steps, 1), "tokens_per_s": round(steps / seconds, 1),
            "setup_s": round(ready, 1), "token": token}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="tinyllava-3b")
    p.add_argument("--contexts", default="1024")
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--no-profile", action="store_true", help="skip the eager kernel profile")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    bandwidth = measure_bandwidth(device) * 1e9 if cuda else None  # measure_bandwidth gives GB/s
    contexts = [int(c) for c in args.contexts.split(",") if c]
    result = {"command": "python " + shlex.join(sys.argv), "device": device_name(device), "shape": args.shape,
              "bandwidth_bytes_per_s": bandwidth, "models": {}}
    ratios = [float(r) for r in args.ratios.split(",") if r]
    for name, model in build_models(args.shape, ratios, device, dtype):
        for context in contexts:
            entry = {"context": context, "decode_weight_bytes": decode_weight_bytes(model)}
            plain = graph_step(model, context, args.steps, compile_step=False)
            entry.update(graph_step_us=plain["step_us"], tokens_per_s=plain["tokens_per_s"])
            if bandwidth:
                entry["weight_floor_step_us"] = round(1e6 * entry["decode_weight_bytes"] / bandwidth, 1)
            if cuda and not args.no_profile:
                entry["eager_profile"] = profile_step(plain["engine"], context, plain["token"])
            del plain
            if args.compile:
                fused = graph_step(model, context, args.steps, compile_step=True)
                entry.update(compiled_step_us=fused["step_us"], compiled_tokens_per_s=fused["tokens_per_s"],
                             compile_and_capture_s=fused["setup_s"])
                del fused
            result["models"][f"{name}@{context}"] = entry
            print(name, json.dumps({k: v for k, v in entry.items() if k != "eager_profile"}), flush=True)
            with open(args.out, "w") as f:  # after every point: a run cut short keeps what it measured
                json.dump(result, f, indent=1)
        del model


if __name__ == "__main__":
    main()
