"""Check and time the GPU scan kernel against the float64 sequential recurrence (run on a CUDA machine).

    python benchmarks/ssd_kernels.py --out ssd_kernels.json

Relative error ||out - ref|| / ||ref|| for y, the final state and the gradients of x, dt, A, B, C, D and
the initial state, on several shapes (head dim 80 = Phi-2, lengths that are not multiples of the chunk),
then forward+backward time of the kernel, the torch chunked scan and causal SDPA attention.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from matvlm.model import kernels
from matvlm.model.ssd import ssd_chunked_torch, ssd_scan, ssd_sequential_reference

SHAPES = [  # batch, length, heads, groups, head dim, state, chunk
    (2, 1428, 32, 32, 80, 80, 256),
    (1, 777, 8, 2, 64, 128, 256),
    (3, 100, 4, 4, 80, 80, 64),
    (1, 4097, 6, 6, 32, 32, 256),
]


def inputs(b, l, h, g, p, n, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x, B, C = r(b, l, h, p), r(b, l, g, n) / n**0.5, r(b, l, g, n) / n**0.5
    dt = F.softplus(r(b, l, h) - 3)
    A = -torch.exp(torch.rand(h, generator=gen, device="cuda") * 2.7)
    D, s0 = r(h), r(b, h, p, n) * 0.1
    leaves = [t.to(dtype) if i in (0, 3, 4) else t for i, t in enumerate((x, dt, A, B, C, D, s0))]
    return [t.requires_grad_() for t in leaves]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(shape, dtype, seed=0):
    b, l, h, g, p, n, chunk = shape
    leaves = inputs(b, l, h, g, p, n, dtype, seed)
    x, dt, A, B, C, D, s0 = leaves
    y, final = ssd_scan(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    gy, gs = torch.randn_like(y, dtype=torch.float32), torch.randn_like(final)
    grads = torch.autograd.grad((y.float() * gy).sum() + (final * gs).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, f_ref = ssd_sequential_reference(*ref_leaves[:5], D=ref_leaves[5], initial_state=ref_leaves[6])
    ref_grads = torch.autograd.grad((y_ref * gy.double()).sum() + (f_ref * gs.double()).sum(), ref_leaves)
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    out = {"y": rel(y, y_ref), "final_state": rel(final, f_ref)}
    out.update({f"grad_{k}": rel(a, r) for k, a, r in zip(names, grads, ref_grads)})
    return out


def timed(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def timings(b=8, l=1428, h=32, p=80, n=80, chunk=256):
    leaves = inputs(b, l, h, h, p, n, torch.bfloat16, 1)
    x, dt, A, B, C, D, _ = leaves

    def run(fn):
        def step():
            y, s = fn()
            (y.float().sum() + s.sum()).backward()
        return step

    res = {"shape": dict(batch=b, length=l, heads=h, head_dim=p, state=n, chunk=chunk, dtype="bfloat16")}
    os.environ[kernels.BACKEND_ENV] = "mamba_ssm"
    res["mamba_ssm_fwd_bwd_ms"] = timed(run(lambda: ssd_scan(x, dt, A, B, C, chunk, D=D)))
    res["torch_chunked_fwd_bwd_ms"] = timed(run(lambda: ssd_chunked_torch(x, dt, A, B, C, chunk, D=D)))
    q = torch.randn(b, h, l, p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)

    def attn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
    res["sdpa_causal_fwd_bwd_ms"] = timed(attn)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert kernels.mamba_chunk_scan() is not None, "mamba_ssm Triton kernels not importable"
    os.environ[kernels.BACKEND_ENV] = "mamba_ssm"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": []}
    import triton
    report["triton"] = triton.__version__
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            errs = check(shape, dtype)
            report["checks"].append({"shape": shape, "dtype": str(dtype).split(".")[-1], "relative_error": errs})
            print(shape, dtype, {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
    report["timing"] = timings()
    print(json.dumps(report["timing"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
