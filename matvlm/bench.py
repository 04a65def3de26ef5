"""Speed and memory benchmark: the teacher and its hybrids in the same engine, with the same settings.

    matvlm bench --shape tinyllava-3b --out benchmarks/ --parts decode,memory,batch,ttft

Models (random weights: speed and memory do not depend on the values) come from `build_models`, one at a
time: the teacher, then each hybrid made from a freshly built teacher that is dropped right after the
conversion, so only one model is resident while it is measured.

Parts (each measurement returns a plain, JSON-ready dict):
- decode  `decode_vs_length`: batch-1 decode tokens/s against generated length (paper Fig. 1b), one image
          + a short prompt, EOS banned so every run goes the full length; the matvlm engine and HF
          `generate` (dynamic cache; only up to `hf_max_length`, it is slow). One run of the longest
          length per model and engine, timed at every step: tokens/s at N = (N - 1) decode steps over
          their time (prefill excluded). Also `decode_at_context`: the engine's decode step alone with the
          cache filled to a given context (2,048 and 16,384 tokens), the headline numbers.
- memory  `peak_memory_vs_length`: peak device memory (weights included) of a batch-1 generation whose
          cache holds prompt + N tokens (Fig. 1c). The engine's cache is static and its CUDA graphs are
          captured for every KV bucket before the prefill, so a short decode already reaches the peak of
          the full one (`memory_decode_tokens`; None decodes all N). On the CPU only the cache bytes are
          reported (peak None).
- batch   `throughput_vs_batch`: decode tokens/s at a fixed context for batch 1, 2, 4, ... until memory
          runs out (the limit is reported), plus how many 16,384-token sequences fit in 80 GiB next to
          the weights (from `cache_bytes`).
- ttft    `time_to_first_token`: one image + a 100-token prompt to the first new token (median of repeats).

Floors. Decode at small batch is bound by memory traffic: every step reads the decoder weights, each
sequence's keys and values up to its context, and reads and writes each mixer state. `floor_tokens_per_s`
divides those bytes by the measured device bandwidth (`measure_bandwidth`: a large device-to-device copy,
read + write bytes over time); every speed is also given as a fraction of its floor. The memory floor is
weights + the static cache. TTFT is compute-bound: no floor.

`run_bench` writes `bench_<device>.json` (device, versions, command line, every setting, every
measurement; later runs with other parts or models merge into it), `bench_<device>.md` (the headline
table) and PNG plots.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from . import kernels
from .convert import to_hybrid
from .engine import Engine, cache_bytes
from .engine.text import parse_dtype

SHAPES = ("tinyllava-3b", "tiny")
PARTS = ("decode", "memory", "batch", "ttft")
ENGINES = ("matvlm", "hf")
GIB = 2**30


def powers_of_two(start: int, stop: int) -> tuple[int, ...]:
    """start, 2*start, ... up to stop (stop itself included when it is not a power-of-two multiple)."""
    out, n = [], start
    while n <= stop:
        out.append(n)
        n *= 2
    if not out or out[-1] != stop:
        out.append(stop)
    return tuple(sorted(set(out)))


@dataclass
class BenchConfig:
    """Every setting of one `run_bench` call; saved in the result file."""

    shape: str = "tinyllava-3b"
    parts: tuple[str, ...] = PARTS
    ratios: tuple[float, ...] = (0.125, 0.25, 0.5)
    teacher: bool = True  # also measure the teacher (the reference for every ratio)
    engines: tuple[str, ...] = ENGINES
    lengths: tuple[int, ...] = powers_of_two(256, 16384)  # decode: generated lengths
    hf_max_length: int = 1024  # HF generate only up to this many new tokens (about 15 tokens/s at 3B)
    contexts: tuple[int, ...] = (2048, 16384)  # decode step alone at these contexts (headline)
    memory_lengths: tuple[int, ...] = powers_of_two(256, 32768)
    memory_decode_tokens: int | None = 16  # None: decode all N tokens in the memory part
    batch_context: int = 4096
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    decode_steps: int = 32  # timed steps per point in the context and batch measurements
    prompt_tokens: int = 32  # text tokens after the image in the decode and memory prompts
    ttft_prompt_tokens: int = 100
    ttft_repeats: int = 5
    memory_gib: float = 80.0  # the card for "sequences that fit" (an H100's 80 GB)
    concurrent_length: int = 16384
    device: str | None = None  # default: cuda if available
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    use_cuda_graph: bool | str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.parts, self.engines = tuple(self.parts), tuple(self.engines)
        self.ratios = tuple(float(r) for r in self.ratios)
        for name in ("lengths", "contexts", "memory_lengths", "batches"):
            values = tuple(sorted({int(v) for v in getattr(self, name)}))
            if not values or values[0] < 1:
                raise ValueError(f"bench setting {name} must hold positive integers, got {getattr(self, name)}")
            setattr(self, name, values)
        if self.shape not in SHAPES:
            raise ValueError(f"unknown bench shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"unknown bench parts {unknown or self.parts}; choose from {', '.join(PARTS)}")
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"unknown bench engines {unknown or self.engines}; choose from {', '.join(ENGINES)}")
        if not self.teacher and not self.ratios:
            raise ValueError("nothing to measure: no teacher and no ratios")
        if self.decode_steps < 1 or self.ttft_repeats < 1 or self.prompt_tokens < 0 or self.ttft_prompt_tokens < 0:
            raise ValueError("decode_steps and ttft_repeats must be >= 1, prompt lengths >= 0")


# ---------------------------------------------------------------------------------------------- models
def tinyllava_3b_config():
    """A LlavaConfig with the shape of TinyLLaVA-Phi-2-SigLIP-3.1B (SigLIP so400m/384, 728 image tokens, Phi-2)."""
    from transformers import LlavaConfig, PhiConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                     num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=4096,
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=50297, image_seq_length=728,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_teacher(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random teacher of `shape`, built directly on `device` (a 3B random init on the CPU takes minutes)."""
    from transformers import LlavaForConditionalGeneration

    from .tiny import tiny_llava

    torch.manual_seed(seed)
    if shape == "tinyllava-3b":
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(tinyllava_3b_config(), dtype=dtype)
    elif shape == "tiny":
        # 8 layers so that 12.5% is one mixer layer; positions beyond the default 512 for long test lengths.
        model = tiny_llava("phi", seed=seed, num_layers=8, max_positions=4096).to(device, dtype)
    else:
        raise ValueError(f"unknown bench shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return model.eval()


def model_name(ratio: float | None) -> str:
    return "teacher" if ratio is None else f"hybrid-{ratio:g}"


def build_models(
    shape: str,
    ratios: Sequence[float] = (0.125, 0.25, 0.5),
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    teacher: bool = True,
    seed: int = 0,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ("teacher", model), then ("hybrid-<ratio>", model) per ratio, one at a time.

    Each hybrid comes from a teacher rebuilt with the same seed (same weights) and dropped right after
    `to_hybrid`: teacher + one hybrid are resident only during a conversion, one model while it is
    measured. Drop your reference to a model before asking for the next one.
    """
    if teacher:
        model = build_teacher(shape, device, dtype, seed)
        yield "teacher", model
        del model
        _free(torch.device(device))
    for ratio in ratios:
        base = build_teacher(shape, device, dtype, seed)
        hybrid = to_hybrid(base, ratio=ratio).eval()
        del base
        _free(torch.device(device))
        yield model_name(ratio), hybrid
        del hybrid
        _free(torch.device(device))


# ---------------------------------------------------------------------------------------------- device helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Give freed device memory back before the next measurement (CUDA graphs and engines hold cycles).
    Not on the CPU, where a full collection costs more than the tiny models' runs."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def is_oom(err: BaseException) -> bool:
    """Out of device memory, whichever layer noticed (allocator, cuBLAS workspace)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def measure_bandwidth(device: str | torch.device = "cuda", nbytes: int | None = None, repeats: int = 10) -> float:
    """Copy bandwidth in GB/s (1e9 bytes): a large buffer copied on the device, read + write bytes per second.

    Default buffer: 1 GiB on a GPU, 64 MiB on the CPU (a memcpy).
    """
    device = torch.device(device)
    nbytes = nbytes or (GIB if device.type == "cuda" else 64 * 2**20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - began
    del src, dst
    _free(device)
    return 2 * nbytes * repeats / seconds / 1e9


# ---------------------------------------------------------------------------------------------- floors
def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (vision tower included): what sits on the device."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: decoder layers, final norm, lm_head.

    The embedding table is not read (one row per token) unless it is tied to lm_head; the vision tower
    and connector run only in the prefill.
    """
    lm = model.model.language_model
    embed = lm.embed_tokens.weight
    seen: dict[int, int] = {}
    for p in lm.parameters():
        if p is not embed:
            seen[id(p)] = p.numel() * p.element_size()
    for p in model.lm_head.parameters():  # a tied lm_head brings the embedding back in, once
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def bytes_per_decode_step(model: nn.Module, context: int, batch: int = 1) -> int:
    """Bytes one decode step must move: weights once, per sequence the keys and values of `context`
    tokens (the new token's own included) and each mixer state read and written."""
    c = cache_bytes(model, 1, context)
    return decode_weight_bytes(model) + batch * (c.kv + 2 * c.mixer)


def floor_tokens_per_s(model: nn.Module, context: int, batch: int, bandwidth: float) -> float:
    """Memory-bound upper limit on decode tokens/s at `context` tokens per sequence; bandwidth in GB/s."""
    return batch * bandwidth * 1e9 / bytes_per_decode_step(model, context, batch)


def floor_generation_tokens_per_s(model: nn.Module, prompt_len: int, new_tokens: int, bandwidth: float) -> float:
    """The floor of `decode_vs_length`'s tokens/s at N: batch 1, N - 1 decode steps whose contexts run
    from prompt_len + 1 to prompt_len + N - 1 (the KV read grows linearly, so the sum is closed-form)."""
    steps = new_tokens - 1
    if steps < 1:
        return floor_tokens_per_s(model, prompt_len + 1, 1, bandwidth)
    fixed = bytes_per_decode_step(model, 0, 1)  # weights + mixer states
    kv_per_token = cache_bytes(model, 1, 1).kv
    contexts = steps * prompt_len + steps * (steps + 1) // 2
    return steps * bandwidth * 1e9 / (steps * fixed + kv_per_token * contexts)


def _pct(value: float | None, floor: float | None) -> float | None:
    return round(100 * value / floor, 1) if value and floor else None


# ---------------------------------------------------------------------------------------------- inputs
def banned_token_ids(model: nn.Module) -> list[int]:
    """Tokens a benchmark run never generates: EOS (so every run goes the full length) and the image token
    (a random model may pick it, and a forward pass would then find more image tokens than images)."""
    gen, text = getattr(model, "generation_config", None), model.config.text_config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = text.eos_token_id if eos is None else eos
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    image = getattr(model.config, "image_token_index", None)
    return sorted({i for i in ids + [image] if i is not None})


def _pad_id(model: nn.Module) -> int:
    pad = model.config.text_config.pad_token_id
    return pad if pad is not None else banned_token_ids(model)[0]


def _ordinary_id_range(model: nn.Module) -> tuple[int, int]:
    vocab = model.lm_head.out_features
    return min(100, vocab // 4), min(50000, vocab)  # clear of the special ids at both ends


def bench_inputs(model: nn.Module, text_tokens: int, batch: int = 1, seed: int = 0):
    """(input_ids, attention_mask, pixel_values) on the model's device: BOS, one image's block of image
    tokens, `text_tokens` random ordinary tokens; a random image per row."""
    config, device = model.config, _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _ordinary_id_range(model)
    special = set(banned_token_ids(model)) | {config.text_config.bos_token_id, config.text_config.pad_token_id}
    text = torch.randint(lo, hi, (batch, text_tokens), generator=gen)
    text[torch.isin(text, torch.tensor(sorted(i for i in special if i is not None)))] = lo
    head = [] if config.text_config.bos_token_id is None else [config.text_config.bos_token_id]
    head += [config.image_token_index] * config.image_seq_length
    ids = torch.cat([torch.tensor(head).expand(batch, -1), text], dim=1)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    dtype = next(model.parameters()).dtype
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device, dtype)


# ---------------------------------------------------------------------------------------------- measurements
class _StepClock(BaseStreamer):
    """A transformers streamer that only records when each push arrives (the first push is the prompt)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
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
    device = _model_device(model)
    ids, mask, pixels = bench_inputs(model, prompt_tokens, seed=seed)
    prompt_len, longest = ids.shape[1], lengths[-1]
    banned = banned_token_ids(model)
    result = {"engine": engine, "batch": 1, "prompt_tokens": prompt_len, "lengths": lengths}

    if engine == "matvlm":
        eng = Engine(model, 1, prompt_len + longest, use_cuda_graph=use_cuda_graph)
        options = dict(suppress_tokens=banned, stop_at_eos=False)
        eng.generate(ids, mask, pixels, max_new_tokens=min(4, longest), **options)  # warm-up, graph capture
        _free(device)
        _reset_peak(device)
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
                       pad_token_id=_pad_id(model))
        model.generate(ids, max_new_tokens=min(4, longest), min_new_tokens=min(4, longest), **options)  # warm-up
        _free(device)
        _reset_peak(device)
        clock = _StepClock(device)
        out = model.generate(ids, max_new_tokens=longest, min_new_tokens=longest, streamer=clock, **options)
        times = clock.times[1:]  # drop the prompt push
        result.update(prefill_seconds=clock.times[1] - clock.times[0], cache="dynamic")
        generated = out.shape[1] - prompt_len
        del out
    if generated != longest or len(times) != longest:
        raise RuntimeError(f"{engine} generated {generated} of {longest} tokens; the benchmark bans EOS, so this is a bug")
    result["peak_bytes"] = _peak(device)
    rates, window = _rates_at(times, lengths)
    result.update(tokens_per_s=rates, window_tokens_per_s=window)
    if bandwidth:
        floors = [floor_generation_tokens_per_s(model, prompt_len, n, bandwidth) for n in lengths]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[_pct(r, f) for r, f in zip(rates, floors)])
    if log:
        log(f"{engine}: " + ", ".join(f"{n}: {r:.1f}" for n, r in zip(lengths, rates) if r) + " tokens/s")
    _free(device)
    return result


@torch.no_grad()
def _timed_decode(model: nn.Module, context: int, batch: int, steps: int, use_cuda_graph: bool | str, warm: int = 2) -> dict:
    """The engine's decode step alone, `steps` times, for `batch` rows whose cache holds `context` tokens.

    The cache is sized for the context (one KV bucket: context + the steps) and marked valid up to
    `context` without a prefill: a step costs the same whatever the cached values are. Greedy choice of
    the next token is included, as in `Engine.generate`.
    """
    device = _model_device(model)
    total = context + warm + steps
    eng = Engine(model, batch, total, use_cuda_graph=use_cuda_graph, min_kv_bucket=total)
    eng.warmup(batch)
    eng.key_valid[:batch].zero_()
    eng.key_valid[:batch, :context] = True
    eng.positions[:batch] = context
    eng.tokens[:batch] = _ordinary_id_range(model)[0]
    for s in range(warm + steps):
        if s == warm:
            _sync(device)
            began = time.perf_counter()
        logits = eng._decode(batch, context + s)
        eng.tokens[:batch].copy_(logits.argmax(-1))
        eng.positions[:batch] += 1
    _sync(device)
    seconds = time.perf_counter() - began
    cache = eng.cache_nbytes().total
    del eng, logits
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
    device = _model_device(model)
    result = {"engine": "matvlm", "batch": batch, "steps": steps, "contexts": list(contexts), "tokens_per_s": []}
    for c in contexts:
        result["tokens_per_s"].append(_timed_decode(model, c, batch, steps, use_cuda_graph)["tokens_per_s"])
        _free(device)
    if bandwidth:
        floors = [floor_tokens_per_s(model, c, batch, bandwidth) for c in contexts]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[_pct(r, f) for r, f in zip(result["tokens_per_s"], floors)])
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
    device = _model_device(model)
    ids, mask, pixels = bench_inputs(model, prompt_tokens, seed=seed)
    prompt_len = ids.shape[1]
    weights = weight_bytes(model)
    rows = []
    for n in sorted({int(n) for n in lengths}):
        _free(device)
        _reset_peak(device)
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        eng = Engine(model, 1, prompt_len + n, use_cuda_graph=use_cuda_graph)
        steps = n if decode_tokens is None else min(n, decode_tokens)
        eng.generate(ids, mask, pixels, max_new_tokens=steps, suppress_tokens=banned_token_ids(model), stop_at_eos=False)
        peak = _peak(device)
        cache = eng.cache_nbytes()
        del eng
        rows.append({"length": n, "cache_slots": prompt_len + n, "decoded_tokens": steps, "peak_bytes": peak,
                     "resident_bytes_before": resident, "cache_bytes": cache.total, "kv_bytes": cache.kv,
                     "mixer_bytes": cache.mixer, "floor_bytes": weights + cache.total})
        if log:
            shown = f"peak {_fmt_bytes(peak)}" if peak is not None else "peak not measured on cpu"
            log(f"memory at {n} tokens: cache {_fmt_bytes(cache.total)}, {shown}")
    _free(device)
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
    device = _model_device(model)
    result = {"engine": "matvlm", "context": context, "steps": steps, "batches": [], "tokens_per_s": [],
              "step_ms": [], "peak_bytes": [], "max_batch": None, "oom_at": None, "oom_predicted": False,
              "concurrent_length": concurrent_length, "memory_bytes": memory_bytes,
              "concurrent_sequences": concurrent_sequences(model, concurrent_length, memory_bytes)}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        result.update(device_total_bytes=total,
                      concurrent_sequences_device=concurrent_sequences(model, concurrent_length, total))
    for b in sorted({int(b) for b in batches}):
        _free(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if cache_bytes(model, b, context + steps + 2).total > free:
                result.update(oom_at=b, oom_predicted=True)
                break
        _reset_peak(device)
        try:
            run = _timed_decode(model, context, b, steps, use_cuda_graph)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_oom(err):
                raise
            result["oom_at"] = b
            break
        finally:
            _free(device)
        result["batches"].append(b)
        result["tokens_per_s"].append(run["tokens_per_s"])
        result["step_ms"].append(run["step_ms"])
        result["peak_bytes"].append(_peak(device))
        result["max_batch"] = b
        if log:
            log(f"batch {b} at {context} tokens: {run['tokens_per_s']:.1f} tokens/s")
    if log and result["oom_at"]:
        log(f"out of memory at batch {result['oom_at']}" + (" (predicted)" if result["oom_predicted"] else ""))
    if bandwidth:
        floors = [floor_tokens_per_s(model, context, b, bandwidth) for b in result["batches"]]
        result.update(bandwidth_gb_s=bandwidth, floor_tokens_per_s=floors,
                      pct_of_floor=[_pct(r, f) for r, f in zip(result["tokens_per_s"], floors)])
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
    device = _model_device(model)
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
                           suppress_tokens=banned, pad_token_id=_pad_id(model))

    once()  # warm-up (CUDA graph capture, kernel selection)
    prefills.clear()
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        once()
        _sync(device)
        walls.append(time.perf_counter() - began)
    result = {"engine": engine, "batch": 1, "prompt_tokens": ids.shape[1], "text_tokens": prompt_tokens,
              "image_size": model.config.vision_config.image_size, "repeats": repeats,
              "seconds": statistics.median(walls), "all_seconds": walls}
    if prefills:
        result["prefill_seconds"] = statistics.median(prefills)
    _free(device)
    return result


# ---------------------------------------------------------------------------------------------- the run
def describe_model(model: nn.Module, cfg: BenchConfig) -> dict:
    mixers = list(getattr(model.config, "mamba_layers", None) or [])
    per_token = cache_bytes(model, 1, 1)
    at_length = cache_bytes(model, 1, cfg.concurrent_length).total
    memory = int(cfg.memory_gib * GIB)
    return {
        "kind": "hybrid" if mixers else "teacher",
        "ratio": len(mixers) / model.config.text_config.num_hidden_layers,
        "num_layers": model.config.text_config.num_hidden_layers,
        "mixer_layers": mixers,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "decode_weight_bytes": decode_weight_bytes(model),
        "kv_bytes_per_token": per_token.kv,
        "mixer_state_bytes": per_token.mixer,
        "concurrent_length": cfg.concurrent_length,
        "cache_bytes_at_concurrent_length": at_length,
        "memory_bytes": memory,
        "concurrent_sequences": concurrent_sequences(model, cfg.concurrent_length, memory),
    }


def _console_log() -> Callable[[str], None]:
    try:
        from rich.console import Console
    except ImportError:  # a bare GPU image: plain lines
        return lambda message: print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
    console = Console(stderr=True)
    return lambda message: console.print(f"{time.strftime('%H:%M:%S')} {message}", highlight=False, markup=False)


def run_bench(
    out_dir: str | Path,
    shape: str = "tinyllava-3b",
    parts: Sequence[str] = PARTS,
    device: str | None = None,
    merge: bool = True,
    plots: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    **settings,
) -> dict:
    """Measure the parts for the teacher and each hybrid; write `bench_<device>.json`, `.md` and plots.

    `settings` are `BenchConfig` fields (ratios, lengths, hf_max_length, contexts, memory_lengths,
    batches, ...). With `merge`, an existing result file of the same device, shape and dtype keeps what
    this run does not measure (other parts or models); a file of another shape or dtype is an error.
    The file is rewritten after every model, so a run cut short keeps what it measured.
    """
    cfg = BenchConfig(shape=shape, parts=tuple(parts), device=device, **settings)
    log = log or _console_log()
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = parse_dtype(cfg.dtype, dev.type)
    dtype_name = str(dtype).removeprefix("torch.")
    name = device_name(dev)
    out_dir = Path(out_dir)
    path = out_dir / f"bench_{device_slug(name)}.json"

    results = _start_results(path, merge, name, cfg.shape, dtype_name)
    bandwidth = measure_bandwidth(dev)
    log(f"bench {cfg.shape} on {name} ({dtype_name}): copy bandwidth {bandwidth:.0f} GB/s; parts {', '.join(cfg.parts)}")
    results["bandwidth_gb_s"] = bandwidth
    results["runs"].append({
        "command": command or shlex.join(sys.argv),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": _jsonable(asdict(cfg)),
        "bandwidth_gb_s": bandwidth,
        "cuda_graph": dev.type == "cuda" if cfg.use_cuda_graph == "auto" else bool(cfg.use_cuda_graph),
        "scan_backend": kernels.scan_backend(dev.type),
    })
    graph = cfg.use_cuda_graph

    for model_key, model in build_models(cfg.shape, cfg.ratios, dev, dtype, cfg.teacher, cfg.seed):
        log(f"{model_key}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters")
        results["models"][model_key] = describe_model(model, cfg)
        if "decode" in cfg.parts:
            entry = {}
            for engine in cfg.engines:
                lengths = [n for n in cfg.lengths if engine == "matvlm" or n <= cfg.hf_max_length]
                if lengths:
                    log(f"{model_key}: decode, {engine} engine, {lengths[-1]} tokens")
                    entry[engine] = decode_vs_length(model, lengths, engine, cfg.prompt_tokens, bandwidth, graph,
                                                     cfg.seed, log)
            log(f"{model_key}: decode step at contexts {list(cfg.contexts)}")
            entry["at_context"] = decode_at_context(model, cfg.contexts, 1, cfg.decode_steps, bandwidth, graph)
            results["decode"][model_key] = {**results["decode"].get(model_key, {}), **entry}  # keep other engines
        if "memory" in cfg.parts:
            log(f"{model_key}: memory at {list(cfg.memory_lengths)} tokens")
            results["memory"][model_key] = peak_memory_vs_length(
                model, cfg.memory_lengths, cfg.prompt_tokens, cfg.memory_decode_tokens, graph, cfg.seed, log)
        if "batch" in cfg.parts:
            log(f"{model_key}: batch sweep at {cfg.batch_context} tokens")
            results["batch"][model_key] = throughput_vs_batch(
                model, cfg.batch_context, cfg.batches, cfg.decode_steps, bandwidth, int(cfg.memory_gib * GIB),
                cfg.concurrent_length, graph, log)
        if "ttft" in cfg.parts:
            entry = {}
            for engine in cfg.engines:
                entry[engine] = time_to_first_token(model, cfg.ttft_prompt_tokens, engine, cfg.ttft_repeats, graph,
                                                    cfg.seed)
                log(f"{model_key}: time to first token ({engine}) {entry[engine]['seconds'] * 1e3:.1f} ms")
            results["ttft"][model_key] = {**results["ttft"].get(model_key, {}), **entry}
        del model
        _free(dev)
        results["headline"] = headline_table(results)
        _write_atomic(path, json.dumps(results, indent=2) + "\n")  # after every model: a run cut short keeps it

    _write_atomic(out_dir / f"{path.stem}.md", results["headline"] + "\n")
    if plots:
        try:
            results["plots"] = [p.name for p in plot_results(results, out_dir, path.stem)]
            _write_atomic(path, json.dumps(results, indent=2) + "\n")
        except ImportError:
            log(f"matplotlib is not installed: no plots; make them elsewhere with `python -m matvlm.bench --replot {path}`")
    log(f"results in {path}")
    return results


def replot(path: str | Path) -> list[Path]:
    """Plots and headline table again from a result file (e.g. one made on a machine without matplotlib)."""
    path = Path(path)
    results = json.loads(path.read_text())
    results["headline"] = headline_table(results)
    _write_atomic(path.with_suffix(".md"), results["headline"] + "\n")
    written = plot_results(results, path.parent, path.stem)
    results["plots"] = [p.name for p in written]
    _write_atomic(path, json.dumps(results, indent=2) + "\n")
    return written


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file next to `path`, then rename: an interrupted write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _start_results(path: Path, merge: bool, name: str, shape: str, dtype: str) -> dict:
    import transformers

    from . import __version__

    header = {"device": name, "shape": shape, "dtype": dtype}
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away or run without merging") from err
        theirs = {k: old.get(k) for k in header}
        if theirs != header:
            raise ValueError(
                f"{path} holds results for {theirs}, this run is {header}: choose another output folder or "
                "start a fresh file (--fresh)"
            )
        old.update(torch=torch.__version__, transformers=transformers.__version__, matvlm=__version__)
        return old
    return {
        **header,
        "device_type": "cuda" if name != "cpu" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "matvlm": __version__,
        "python": sys.version.split()[0],
        "runs": [],
        "models": {},
        **{part: {} for part in PARTS},
    }


# ---------------------------------------------------------------------------------------------- report
def _model_order(results: dict) -> list[str]:
    names = list(results.get("models", {}))
    return sorted(names, key=lambda n: (n != "teacher", results["models"][n].get("ratio", 0)))


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "–"


def headline_table(results: dict) -> str:
    """Markdown: per model, decode tokens/s at each headline context (and % of its floor), the cache at
    the concurrent length, how many such sequences fit next to the weights, TTFT, each also vs the teacher."""
    contexts = next((list(e["at_context"]["contexts"]) for e in results.get("decode", {}).values()
                     if "at_context" in e), [])
    models = results.get("models", {})
    teacher = models.get("teacher", {})
    t_decode = results.get("decode", {}).get("teacher", {}).get("at_context", {})
    t_ttft = results.get("ttft", {}).get("teacher", {}).get("matvlm", {}).get("seconds")
    length = next(iter(models.values()), {}).get("concurrent_length", 16384)
    memory_gib = next(iter(models.values()), {}).get("memory_bytes", 80 * GIB) / GIB
    head = ["model", "mixer layers"]
    for c in contexts:
        head += [f"tokens/s @ {c:,}", "% of floor", "vs teacher"]
    head += [f"cache @ {length:,}", "vs teacher", f"{length:,}-token sequences in {memory_gib:g} GiB", "vs teacher",
             "TTFT (ms)", "vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _model_order(results):
        info = models[name]
        row = [name, ", ".join(map(str, info["mixer_layers"])) or "–"]
        at = results.get("decode", {}).get(name, {}).get("at_context", {})
        for i, c in enumerate(contexts):
            tps = at.get("tokens_per_s", [None] * len(contexts))[i] if at.get("contexts") == contexts else None
            pct = at.get("pct_of_floor", [None] * len(contexts))[i] if at.get("contexts") == contexts else None
            ref = t_decode.get("tokens_per_s", [None] * len(contexts))[i] if t_decode.get("contexts") == contexts else None
            row += [f"{tps:,.1f}" if tps else "–", f"{pct:.0f}%" if pct else "–", _ratio(tps, ref)]
        cache = info["cache_bytes_at_concurrent_length"]
        row += [_fmt_bytes(cache), _ratio(cache, teacher.get("cache_bytes_at_concurrent_length"))]
        row += [f"{info['concurrent_sequences']:,}", _ratio(info["concurrent_sequences"], teacher.get("concurrent_sequences"))]
        ttft = results.get("ttft", {}).get(name, {}).get("matvlm", {}).get("seconds")
        row += [f"{ttft * 1e3:.1f}" if ttft else "–", _ratio(ttft, t_ttft)]
        lines.append("| " + " | ".join(row) + " |")
    note = (f"{results.get('device', '?')}, {results.get('dtype', '?')}, batch 1, matvlm engine; floor = bytes per "
            f"decode step / {results.get('bandwidth_gb_s', 0):,.0f} GB/s copy bandwidth; cache = KV + mixer state of "
            f"one sequence; sequences = (memory - weights) / cache.")
    return "\n".join(lines) + "\n\n" + note


def _log2_x(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_results(results: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """PNG plots of what `results` holds: decode tokens/s vs length, memory vs length, throughput vs batch;
    each floor dashed in its model's colour."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out_dir = Path(out_dir)
    names = _model_order(results)
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    where = f"{results.get('device', '?')}, {results.get('dtype', '?')}"
    written = []

    decode = results.get("decode", {})
    if any(e for e in decode.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            for engine, style in (("matvlm", "-o"), ("hf", ":s")):
                r = decode.get(n, {}).get(engine)
                if not r:
                    continue
                pts = [(x, y) for x, y in zip(r["lengths"], r["tokens_per_s"]) if y]
                ax.plot(*zip(*pts), style, color=colours[n], label=f"{n} ({engine})", markersize=4)
                if engine == "matvlm" and r.get("floor_tokens_per_s"):
                    ax.plot(r["lengths"], r["floor_tokens_per_s"], "--", color=colours[n], alpha=0.5, linewidth=1)
        ax.set(yscale="log", xlabel="generated tokens", ylabel="decode tokens/s (batch 1)",
               title=f"Decode speed vs length ({where}); dashed: bandwidth floor")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_decode.png"))

    memory = results.get("memory", {})
    if any(memory.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            r = memory.get(n)
            if not r:
                continue
            x = [row["length"] for row in r["rows"]]
            peaks = [row["peak_bytes"] for row in r["rows"]]
            if all(p is not None for p in peaks):
                ax.plot(x, [p / GIB for p in peaks], "-o", color=colours[n], label=f"{n} peak", markersize=4)
            ax.plot(x, [row["floor_bytes"] / GIB for row in r["rows"]], "--", color=colours[n], alpha=0.6,
                    label=f"{n} weights + cache")
        ax.set(xlabel="generated tokens", ylabel="GiB", title=f"Memory vs length, batch 1 ({where})")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_memory.png"))

    batch = results.get("batch", {})
    if any(batch.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            r = batch.get(n)
            if not r or not r["batches"]:
                continue
            label = n + (f" (out of memory at {r['oom_at']})" if r.get("oom_at") else "")
            ax.plot(r["batches"], r["tokens_per_s"], "-o", color=colours[n], label=label, markersize=4)
            if r.get("floor_tokens_per_s"):
                ax.plot(r["batches"], r["floor_tokens_per_s"], "--", color=colours[n], alpha=0.5, linewidth=1)
        context = next((r["context"] for r in batch.values() if r), "?")
        ax.set(yscale="log", xlabel="batch", ylabel="decode tokens/s (all rows)",
               title=f"Throughput vs batch at {context} tokens ({where}); dashed: floor")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_batch.png"))
    return written


# ---------------------------------------------------------------------------------------------- command
def _split(text: str, kind: Callable, what: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from err


def bench_command(
    shape: str = "tinyllava-3b",
    out: str | Path = "benchmarks",
    parts: str = ",".join(PARTS),
    max_length: int = 16384,
    max_memory_length: int = 32768,
    hf_max_length: int = 1024,
    ratios: str = "0.125,0.25,0.5",
    teacher: bool = True,
    engines: str = ",".join(ENGINES),
    contexts: str = "2048,16384",
    batch_context: int = 4096,
    device: str | None = None,
    dtype: str | None = None,
    fresh: bool = False,
) -> dict:
    """`matvlm bench`: the options as strings and numbers, lengths as powers of two from 256 (smaller
    maxima are measured as given). Raises ValueError on a bad option."""
    start = min(256, max_length)
    return run_bench(
        out, shape=shape, parts=_split(parts, str.strip, "--parts"), device=device, merge=not fresh,
        ratios=_split(ratios, float, "--ratios"), teacher=teacher, engines=_split(engines, str.strip, "--engines"),
        lengths=powers_of_two(start, max_length), memory_lengths=powers_of_two(min(256, max_memory_length), max_memory_length),
        hf_max_length=hf_max_length, contexts=_split(contexts, int, "--contexts"), batch_context=batch_context,
        dtype=dtype,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m matvlm.bench ...`: the same options as `matvlm bench`, for machines without typer."""
    p = argparse.ArgumentParser(prog="python -m matvlm.bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tinyllava-3b", choices=SHAPES)
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--max-memory-length", type=int, default=32768)
    p.add_argument("--hf-max-length", type=int, default=1024)
    p.add_argument("--ratios", default="0.125,0.25,0.5")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--contexts", default="2048,16384")
    p.add_argument("--batch-context", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--fresh", action="store_true", help="start a new result file instead of merging")
    p.add_argument("--replot", default=None, help="only redraw plots and table from this result file")
    a = p.parse_args(argv)
    if a.replot:
        for path in replot(a.replot):
            print(path)
        return
    results = bench_command(a.shape, a.out, a.parts, a.max_length, a.max_memory_length, a.hf_max_length, a.ratios,
                            not a.no_teacher, a.engines, a.contexts, a.batch_context, a.device, a.dtype, a.fresh)
    print(results["headline"])


if __name__ == "__main__":
    main()


__all__ = [
    "BenchConfig",
    "bench_command",
    "build_models",
    "build_teacher",
    "bytes_per_decode_step",
    "concurrent_sequences",
    "decode_at_context",
    "decode_vs_length",
    "decode_weight_bytes",
    "floor_generation_tokens_per_s",
    "floor_tokens_per_s",
    "headline_table",
    "main",
    "measure_bandwidth",
    "peak_memory_vs_length",
    "plot_results",
    "replot",
    "run_bench",
    "throughput_vs_batch",
    "time_to_first_token",
    "tinyllava_3b_config",
    "weight_bytes",
]
