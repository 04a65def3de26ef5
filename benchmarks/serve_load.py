"""Load test of `matvlm serve`, on loopback only, bounded in requests and in time.

CPU mode (default; part of the test suite with a small N): the shipped teacher and a 50% hybrid made from
it, each served over HTTP on 127.0.0.1. First every distinct prompt is sent alone (its single-request greedy
answer), then N concurrent streaming clients send image prompts of mixed lengths; every answer under load
must equal its prompt's answer alone (same text, same token count). Reports throughput, time to first
token and latency (p50 / p99) and errors.

GPU mode (--gpu): the TinyLLaVA-3.1B shape with random weights, teacher vs 25% and 50% hybrids, prompts of
4,096 and 16,384 tokens, concurrency swept up to the most rows the card's memory holds. A random-weight
model has no tokenizer, so this mode submits token prompts to the server's scheduler directly (the
continuous-batching path the HTTP handlers use, minus JSON and tokenization). Sustained tokens/s and the
most concurrent requests served go to a JSON file (with the card and the command) and a plot.

    python benchmarks/serve_load.py --clients 4 --requests 8                 # CPU, shipped models
    PYTHONPATH=. python benchmarks/serve_load.py --gpu --time-limit 400 --out benchmarks/serve_load_h100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Describe the image.", "What color is the large shape?", "Name the shapes.",
             "How many objects are there in this picture? Count every one of them carefully before answering.",
             "Is there a red circle?"]
FILLER = " Please look closely at the whole picture, at each object, its colour, its size and where it is."


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------------------------------------- CPU / HTTP
def scene_png(seed: int) -> bytes:
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (128, 128), (245, 245, 220))
    draw = ImageDraw.Draw(im)
    for k in range(1 + seed % 3):
        x, y = 10 + 40 * k, 20 + 25 * ((seed + k) % 3)
        (draw.ellipse if (seed + k) % 2 else draw.rectangle)((x, y, x + 30, y + 30),
                                                             fill=[(220, 30, 30), (30, 90, 220), (30, 170, 60)][k % 3])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def prompt_body(i: int) -> dict:
    """Prompt i: an image, one of the questions, 0-3 filler sentences (mixed lengths), mixed max_tokens; odd
    prompts run to max_tokens (an undistilled hybrid stops early otherwise, and long answers overlap more)."""
    import base64

    text = QUESTIONS[i % len(QUESTIONS)] + FILLER * (i % 4)
    url = "data:image/png;base64," + base64.b64encode(scene_png(i)).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}],
            "temperature": 0, "max_tokens": [16, 32, 24, 48][i % 4], "ignore_eos": i % 2 == 1, "stream": True,
            "stream_options": {"include_usage": True}}


async def stream_one(client, url: str, body: dict) -> dict:
    """One streamed request: its text, token count, TTFT and latency, or its error."""
    began = time.perf_counter()
    first, pieces, usage = None, [], None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        pieces.append(choice["delta"]["content"])
    except Exception as err:  # a transport error is a result to report, not a crash
        return {"error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    return {"text": "".join(pieces), "tokens": usage["completion_tokens"] if usage else None,
            "ttft_s": (first or end) - began, "latency_s": end - began}


async def load_run(url: str, clients: int, requests: int, prompts: int, time_limit_s: float) -> dict:
    import httpx

    queue = list(range(requests))
    results: dict[int, dict] = {}
    deadline = time.perf_counter() + time_limit_s

    async with httpx.AsyncClient(timeout=time_limit_s) as client:
        alone = {}
        for p in range(min(prompts, requests)):  # each distinct prompt by itself first: the reference
            alone[p] = await stream_one(client, url, prompt_body(p))

        async def worker(w: int):
            while queue and time.perf_counter() < deadline:
                i = queue.pop(0)
                await asyncio.sleep(0.01 * (i % 3))  # staggered arrivals: requests join a running batch
                results[i] = await stream_one(client, url, prompt_body(i % prompts))

        began = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - began

    done = [r for r in results.values() if "error" not in r]
    mismatched = [i for i, r in results.items() if "error" not in r
                  and (r["text"], r["tokens"]) != (alone[i % prompts].get("text"), alone[i % prompts].get("tokens"))]
    tokens = sum(r["tokens"] or 0 for r in done)
    return {
        "clients": clients, "requests": len(results), "not_sent": len(queue), "wall_s": wall,
        "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile([r["ttft_s"] for r in done], 50), "ttft_p99_s": percentile([r["ttft_s"] for r in done], 99),
        "latency_p50_s": percentile([r["latency_s"] for r in done], 50),
        "latency_p99_s": percentile([r["latency_s"] for r in done], 99),
        "errors": [r["error"] for r in results.values() if "error" in r]
        + [f"prompt alone: {r['error']}" for r in alone.values() if "error" in r],
        "mismatched": mismatched,
    }


def serve_in_thread(served):
    """Start the app with uvicorn on a free 127.0.0.1 port; returns (url, stop)."""
    import socket

    import uvicorn

    from matvlm.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(60)

    return f"http://127.0.0.1:{port}", stop


def cpu_main(args) -> dict:
    from transformers import AutoTokenizer

    import matvlm
    from matvlm.io import load_image_processor, load_vlm
    from matvlm.serve import ServedModel
    from matvlm.synthetic import SHIPPED_TEACHER

    teacher_dir = Path(args.model or SHIPPED_TEACHER)
    runs = {}
    for kind in args.kinds.split(","):
        model = load_vlm(teacher_dir)
        if kind == "hybrid":
            model = matvlm.to_hybrid(model, ratio=0.5).eval()
        served = ServedModel(model, AutoTokenizer.from_pretrained(teacher_dir), load_image_processor(teacher_dir),
                             "phi_short", name=kind, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                             max_queue=args.clients + args.requests)
        url, stop = serve_in_thread(served)
        try:
            runs[kind] = asyncio.run(load_run(url, args.clients, args.requests, args.prompts, args.time_limit))
        finally:
            stop()
        r = runs[kind]
        print(f"{kind}: {r['requests']} requests by {r['clients']} clients in {r['wall_s']:.1f} s, "
              f"{r['tokens_per_s']:.1f} tokens/s, TTFT p50/p99 {r['ttft_p50_s']:.3f}/{r['ttft_p99_s']:.3f} s, "
              f"latency p50/p99 {r['latency_p50_s']:.3f}/{r['latency_p99_s']:.3f} s, "
              f"{len(r['errors'])} errors, {len(r['mismatched'])} answers unlike alone", flush=True)
    return {"mode": "cpu", "device": "cpu", "runs": runs}


# ---------------------------------------------------------------------------------------------- GPU / scheduler
def sweep(rows: int) -> list[int]:
    return sorted({1, max(1, rows // 4), max(1, rows // 2), rows})


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_point(model, prompt_len: int, new_tokens: int, rows: int, concurrency: list[int], deadline: float) -> dict:
    from matvlm.bench.common import bench_inputs
    from matvlm.engine import Engine
    from matvlm.engine.scheduler import Request, Scheduler, run_alone

    engine = Engine(model, max_batch_size=rows, max_seq_len=prompt_len + new_tokens)
    scheduler = Scheduler(engine, max_queue=10 * rows)
    began = time.perf_counter()
    scheduler.start()  # captures the decode graphs for every batch size
    capture_s = time.perf_counter() - began
    text = prompt_len - 1 - model.config.image_seq_length  # BOS + image block + text = prompt_len
    points, first_jobs = [], []
    for c in concurrency:
        if time.perf_counter() > deadline:
            points.append({"concurrency": c, "skipped": "time limit"})
            continue
        jobs = []
        for i in range(c):
            ids, _, px = bench_inputs(model, text, seed=1000 * c + i)
            jobs.append(Request(ids[0].cpu(), px, max_new_tokens=new_tokens, stop_at_eos=False))
        done = threading.Event()
        remaining = [c]

        def on_event(kind, value):
            if kind == "done":
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        began = time.perf_counter()
        for job in jobs:
            job.on_event = on_event
            scheduler.submit(job)
        done.wait(max(1.0, deadline - time.perf_counter() + 120))
        wall = time.perf_counter() - began
        ok = [j for j in jobs if j.finish_reason == "length"]
        tokens = sum(len(j.tokens) for j in ok)
        points.append({
            "concurrency": c, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile([j.first_token_at - j.submitted_at for j in ok], 50),
            "ttft_p99_s": percentile([j.first_token_at - j.submitted_at for j in ok], 99),
            "latency_p50_s": percentile([j.finished_at - j.submitted_at for j in ok], 50),
            "latency_p99_s": percentile([j.finished_at - j.submitted_at for j in ok], 99),
            "errors": [j.error or j.finish_reason for j in jobs if j.finish_reason != "length"],
        })
        first_jobs = jobs[:2]
        print(f"  concurrency {c}: {tokens / wall:.0f} tokens/s in {wall:.1f} s", flush=True)
    scheduler.shutdown()
    del scheduler, engine
    _empty_cache()
    # The first two answers of the largest point against the same prompts alone (bf16 kernels may pick other
    # reductions at other batch sizes, so this is reported, not asserted, on the GPU).
    alone = Engine(model, max_batch_size=1, max_seq_len=prompt_len + new_tokens)
    same = [job.tokens == run_alone(alone, job) for job in first_jobs if job.finish_reason == "length"]
    del alone
    _empty_cache()
    served = [p for p in points if "tokens_per_s" in p and not p["errors"]]
    return {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "rows": rows, "capture_s": capture_s,
            "points": points, "answers_equal_alone": same,
            "best_tokens_per_s": max((p["tokens_per_s"] for p in served), default=None),
            "most_concurrent_served": max((p["concurrency"] for p in served), default=0)}


def gpu_main(args) -> dict:
    from matvlm.bench.common import build_models, device_name
    from matvlm.engine import cache_bytes

    deadline = time.perf_counter() + args.time_limit
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    results = {}
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    for name, model in build_models(args.shape, ratios=(0.25, 0.5), device=args.device, dtype=dtype):
        results[name] = {}
        for prompt_len in lengths:
            if time.perf_counter() > deadline:
                results[name][str(prompt_len)] = {"skipped": "time limit"}
                continue
            free = torch.cuda.mem_get_info()[0] if cuda else 2**62  # CPU (a check of this mode): --max-rows decides
            per_row = cache_bytes(model, 1, prompt_len + args.new_tokens).total
            # Room for one prefill beside the cache: its own transformers cache plus activations.
            headroom = cache_bytes(model, 1, prompt_len).total + int(args.headroom_gib * 2**30)
            rows = max(1, min(args.max_rows, (free - headroom) // per_row))
            print(f"{name}, {prompt_len}-token prompts: {rows} rows of {per_row / 2**30:.2f} GiB", flush=True)
            results[name][str(prompt_len)] = gpu_point(model, prompt_len, args.new_tokens, rows, sweep(rows), deadline)
        del model
    return {"mode": "gpu", "shape": args.shape, "device": device_name(args.device), "torch": torch.__version__,
            "results": results}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(k) for r in result["results"].values() for k in r})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for name, by_len in result["results"].items():
            pts = [p for p in by_len.get(str(length), {}).get("points", []) if "tokens_per_s" in p]
            if not pts:
                continue
            ax.plot([p["concurrency"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", label=name)
        ax.set(title=f"{length:,}-token prompts", xlabel="concurrent requests", ylabel="generated tokens/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"matvlm serve, {result['shape']} shape (random weights), {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="TinyLLaVA-3.1B shape on CUDA (see the module docstring)")
    parser.add_argument("--out", default=None, help="JSON (and, with --gpu, PNG) path prefix")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds; later points are skipped")
    parser.add_argument("--model", default=None, help="CPU: teacher directory (default: the shipped teacher)")
    parser.add_argument("--kinds", default="teacher,hybrid", help="CPU: teacher and/or hybrid (50%% of layers)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="CPU: distinct prompts (each also sent alone)")
    parser.add_argument("--max-batch", type=int, default=3, help="CPU: cache rows (fewer than clients: rows reused)")
    parser.add_argument("--max-seq-len", type=int, default=320)
    parser.add_argument("--prompt-lengths", default="4096,16384", help="GPU: prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="GPU: tokens generated per request")
    parser.add_argument("--max-rows", type=int, default=256, help="GPU: cap on cache rows")
    parser.add_argument("--shape", default="tinyllava-3b", help="GPU mode: tinyllava-3b | tiny (a quick check)")
    parser.add_argument("--device", default="cuda", help="GPU mode: cuda | cpu (cpu: a quick check with --shape tiny)")
    parser.add_argument("--headroom-gib", type=float, default=10.0, help="GPU: memory kept for prefill and graphs")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)), *(argv or sys.argv[1:])])
    if not args.gpu:
        torch.set_num_threads(1)
    result = gpu_main(args) if args.gpu else cpu_main(args)
    result["command"] = command
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        if args.gpu:
            plot(result, out.with_suffix(".png"))
    if args.gpu:
        return 0
    bad = {k: r for k, r in result["runs"].items() if r["errors"] or r["mismatched"] or r["not_sent"]}
    if bad:
        print(f"FAILED: {json.dumps(bad)[:2000]}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
