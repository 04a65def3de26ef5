"""The measurements: decode speed against length and context, peak memory, batch sweep, time to first token."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from matvlm.engine import Engine, cache_bytes
from matvlm.bench.common import ENGINES, GIB, free_memory, model_device, ordinary_id_range, pad_id_of, percentile, peak_memory, reset_peak_memory, synchronize, banned_token_ids, bench_inputs, floor_generation_tokens_per_s, floor_tokens_per_s, is_oom, powers_of_two, weight_bytes
from matvlm.bench.report import format_bytes


# ---------------------------------------------------------------------------------------------- measurements
class _StepClock(BaseStreamer):
    """A transformers streamer that only records when each push arrives (the first push is the prompt)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _rates_at(times: list[float], lengths: Sequence[int]) -> tuple[list[float], list[float]]:
    """times[j - 1]: when j tokens were out. Cumulative tokens/s at each N (N - 1 decode steps) and the
    rate within each window (previous N, N]."""
    rates, window, prev = [], [], 1
    for n in lengths:
        rates.append((n - 1) / (times[n - 1] - times[0]) if n > 1 else None)
        window.append((n - prev) / (times[n - 1] - times[prev - 1]) if n > prev else None)
        prev = n
    return rates, window


def decode_vs_length(
    model: nn.Module,
    lengths: Sequence[int] = powers_of_two(256, 16384),
    engine: str = "matvlm",
    prompt_tokens: int = 32,
    bandwidth: float | None = None,
    use_cuda_graph: bool | str = "auto",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Batch-1 decode tokens/s against generated length, from one timed run of max(lengths) tokens.

    engine "matvlm": the fast engine (static cache, CUDA graphs on a GPU), streamed so each step is
    timed; "hf": `model.generate` with its dynamic cache, timed by a streamer. Both sync once per step.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    lengths = sorted({int(n) for n in lengths})
    device = model_device(model)
    ids, mask, pixels = bench_inputs(model, prompt_tokens, seed=seed)
    prompt_len, longest = ids.shape[1], lengths[-1]
    banned = banned_token_ids(model)
    result = {"engine": engine, "batch": 1, "prompt_tokens": prompt_len, "lengths": lengths}

    if engine == "matvlm":
        eng = Engine(model, 1, prompt_len + longest, use_cuda_graph=use_cuda_graph)
        options = dict(suppress_tokens=banned, stop_at_eos=False)
        eng.generate(ids, mask, pixels, max_new_tokens=min(4, longest), **options)  # warm-up, graph capture
        free_memory(device)
        reset_peak_memory(device)
        stream = eng.generate(ids, mask, pixels, max_new_tokens=longest, stream=True, **options)
        times = []
        for _ in stream:
            times.append(time.perf_counter())
        out = stream.result
        result.update(cuda_graph=eng.use_cuda_graph, prefill_seconds=out.prefill_seconds,
                      run_tokens_per_s=out.decode_tokens_per_s, cache_bytes=eng.cache_nbytes().total)
        generated = out.tokens.shape[1]
        del eng, stream, out
    else:
        options = dict(attention_mask=mask, pixel_values=pixels, do_sample=False, suppress_tokens=banned,
                       pad_token_id=pad_id_of(model))
        model.generate(ids, max_new_tokens=min(4, longest), min_new_tokens=min(4, longest), **options)  # warm-up
        free_memory(device)
        reset_peak_memory(device)
        clock = _StepClock(device)
        out = model.generate(ids, max_new_tokens=longest, min_new_tokens=longest, streamer=clock, **options)
        times = clock.times[1:]  # drop the prompt push
        result.update(prefill_seconds=clock.times[1] - clock.times[0], cache="dynamic")
        generated = out.shape[1] - prompt_len
        del out
    if generated != longest or len(times) != longest:
        raise RuntimeError(f"{engine} generated {generated} of {longest} tokens; the benchmark bans EOS, so this is a bug")
    result["peak_bytes"] = peak_memory(device)
    rates, window = _rates_at(times, lengths)
    result.update(tokens_per_s=rates, window_tokens_per_s=window)
    if bandwidth:
        floors = [floor_generation_tokens_per_s(model, prompt_len, n, bandwidth) for n in lengths]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[percentile(r, f) for r, f in zip(rates, floors)])
    if log:
        log(f"{engine}: " + ", ".join(f"{n}: {r:.1f}" for n, r in zip(lengths, rates) if r) + " tokens/s")
    free_memory(device)
    return result


@torch.no_grad()
def _timed_decode(model: nn.Module, context: int, batch: int, steps: int, use_cuda_graph: bool | str, warm: int = 2) -> dict:
    """The engine's decode step alone, `steps` times, for `batch` rows whose cache holds `context` tokens.

    The cache is sized for the context (one KV bucket: context + the steps) and marked valid up to
    `context` without a prefill: a step costs the same whatever the cached values are. Greedy choice of
    the next token is included, as in `Engine.generate`.
    """
    total = context + warm + steps
    eng = Engine(model, batch, total, use_cuda_graph=use_cuda_graph, min_kv_bucket=total)
    seconds = eng.time_decode_steps(batch, context, steps, ordinary_id_range(model)[0], warm=warm)
    cache = eng.cache_nbytes().total
    del eng
    return {"seconds": seconds, "tokens_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps,
            "kv_slots": total, "cache_bytes": cache}


def decode_at_context(
    model: nn.Module,
    contexts: Sequence[int] = (2048, 16384),
    batch: int = 1,
    steps: int = 32,
    bandwidth: float | None = None,
    use_cuda_graph: bool | str = "auto",
) -> dict:
    """Decode tokens/s of the engine's step with the cache filled to each context (see `_timed_decode`)."""
    device = model_device(model)
    result = {"engine": "matvlm", "batch": batch, "steps": steps, "contexts": list(contexts), "tokens_per_s": []}
    for c in contexts:
        result["tokens_per_s"].append(_timed_decode(model, c, batch, steps, use_cuda_graph)["tokens_per_s"])
        free_memory(device)
    if bandwidth:
        floors = [floor_tokens_per_s(model, c, batch, bandwidth) for c in contexts]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[percentile(r, f) for r, f in zip(result["tokens_per_s"], floors)])
    return result


def peak_memory_vs_length(
    model: nn.Module,
    lengths: Sequence[int] = powers_of_two(256, 32768),
    prompt_tokens: int = 32,
    decode_tokens: int | None = 16,
    use_cuda_graph: bool | str = "auto",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Peak device memory of a batch-1 engine generation whose cache holds prompt + N slots, per N.

    peak_bytes: torch.cuda.max_memory_allocated over engine build + prefill + decode, weights included
    (None on the CPU). cache_bytes: the engine's static cache as allocated; floor_bytes: weights + cache.
    `decode_tokens` new tokens are decoded (None: all N; see the module docstring for why a few suffice).
    """
    device = model_device(model)
    ids, mask, pixels = bench_inputs(model, prompt_tokens, seed=seed)
    prompt_len = ids.shape[1]
    weights = weight_bytes(model)
    rows = []
    for n in sorted({int(n) for n in lengths}):
        free_memory(device)
        reset_peak_memory(device)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        eng = Engine(model, 1, prompt_len + n, use_cuda_graph=use_cuda_graph)
        steps = n if decode_tokens is None else min(n, decode_tokens)
        eng.generate(ids, mask, pixels, max_new_tokens=steps, suppress_tokens=banned_token_ids(model), stop_at_eos=False)
        peak = peak_memory(device)
        cache = eng.cache_nbytes()
        del eng
        rows.append({"length": n, "cache_slots": prompt_len + n, "decoded_tokens": steps, "peak_bytes": peak,
                     "resident_bytes_before": resident, "cache_bytes": cache.total, "kv_bytes": cache.kv,
                     "mixer_bytes": cache.mixer, "floor_bytes": weights + cache.total})
        if log:
            shown = f"peak {format_bytes(peak)}" if peak is not None else "peak not measured on cpu"
            log(f"memory at {n} tokens: cache {format_bytes(cache.total)}, {shown}")
    free_memory(device)
    return {"engine": "matvlm", "batch": 1, "prompt_tokens": prompt_len, "weight_bytes": weights,
            "decode_tokens": decode_tokens, "lengths": [r["length"] for r in rows], "rows": rows}


def concurrent_sequences(model: nn.Module, length: int = 16384, memory_bytes: int = 80 * GIB) -> int:
    """How many sequences of `length` cache slots fit in `memory_bytes` next to the weights (cache only:
    activations and CUDA graphs need a little more)."""
    per_sequence = cache_bytes(model, 1, length).total
    return max(0, (memory_bytes - weight_bytes(model)) // per_sequence)


def throughput_vs_batch(
    model: nn.Module,
    context: int = 4096,
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    steps: int = 32,
    bandwidth: float | None = None,
    memory_bytes: int = 80 * GIB,
    concurrent_length: int = 16384,
    use_cuda_graph: bool | str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Decode tokens/s at `context` for growing batches, until the device runs out of memory.

    The sweep stops at the first batch whose cache cannot be allocated (predicted from free memory, or
    an out-of-memory error): `max_batch` is the last that ran, `oom_at` the one that did not.
    """
    device = model_device(model)
    result = {"engine": "matvlm", "context": context, "steps": steps, "batches": [], "tokens_per_s": [],
              "step_ms": [], "peak_bytes": [], "max_batch": None, "oom_at": None, "oom_predicted": False,
              "concurrent_length": concurrent_length, "memory_bytes": memory_bytes,
              "concurrent_sequences": concurrent_sequences(model, concurrent_length, memory_bytes)}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        result.update(device_total_bytes=total,
                      concurrent_sequences_device=concurrent_sequences(model, concurrent_length, total))
    for b in sorted({int(b) for b in batches}):
        free_memory(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if cache_bytes(model, b, context + steps + 2).total > free:
                result.update(oom_at=b, oom_predicted=True)
                break
        reset_peak_memory(device)
        try:
            run = _timed_decode(model, context, b, steps, use_cuda_graph)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_oom(err):
                raise
            result["oom_at"] = b
            break
        finally:
            free_memory(device)
        result["batches"].append(b)
        result["tokens_per_s"].append(run["tokens_per_s"])
        result["step_ms"].append(run["step_ms"])
        result["peak_bytes"].append(peak_memory(device))
        result["max_batch"] = b
        if log:
            log(f"batch {b} at {context} tokens: {run['tokens_per_s']:.1f} tokens/s")
    if log and result["oom_at"]:
        log(f"out of memory at batch {result['oom_at']}" + (" (predicted)" if result["oom_predicted"] else ""))
    if bandwidth:
        floors = [floor_tokens_per_s(model, context, b, bandwidth) for b in result["batches"]]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[percentile(r, f) for r, f in zip(result["tokens_per_s"], floors)])
    return result


def time_to_first_token(
    model: nn.Module,
    prompt_tokens: int = 100,
    engine: str = "matvlm",
    repeats: int = 5,
    use_cuda_graph: bool | str = "auto",
    seed: int = 0,
) -> dict:
    """Seconds from a batch-1 request (one image at the model's resolution + `prompt_tokens` text tokens,
    already on the device) to its first new token on the host; median of `repeats` after one warm-up."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    device = model_device(model)
    ids, mask, pixels = bench_inputs(model, prompt_tokens, seed=seed)
    banned = banned_token_ids(model)
    walls, prefills = [], []
    if engine == "matvlm":
        eng = Engine(model, 1, ids.shape[1] + 1, use_cuda_graph=use_cuda_graph)

        def once():
            out = eng.generate(ids, mask, pixels, max_new_tokens=1, suppress_tokens=banned)
            prefills.append(out.prefill_seconds)
    else:
        def once():
            model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1, do_sample=False,
                           suppress_tokens=banned, pad_token_id=pad_id_of(model))

    once()  # warm-up (CUDA graph capture, kernel selection)
    prefills.clear()
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        once()
        synchronize(device)
        walls.append(time.perf_counter() - began)
    result = {"engine": engine, "batch": 1, "prompt_tokens": ids.shape[1], "text_tokens": prompt_tokens,
              "image_size": model.config.vision_config.image_size, "repeats": repeats,
              "seconds": statistics.median(walls), "all_seconds": walls}
    if prefills:
        result["prefill_seconds"] = statistics.median(prefills)
    free_memory(device)
    return result
