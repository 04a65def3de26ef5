"""Shared pieces of the benchmark: settings, model builders, device helpers, bandwidth floors, inputs."""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from matvlm.model.convert import to_hybrid
from matvlm.engine import cache_bytes

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

    from matvlm.testing import tiny_llava

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
        free_memory(torch.device(device))
    for ratio in ratios:
        base = build_teacher(shape, device, dtype, seed)
        hybrid = to_hybrid(base, ratio=ratio).eval()
        del base
        free_memory(torch.device(device))
        yield model_name(ratio), hybrid
        del hybrid
        free_memory(torch.device(device))


# ---------------------------------------------------------------------------------------------- device helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give freed device memory back before the next measurement (CUDA graphs and engines hold cycles).
    Not on the CPU, where a full collection costs more than the tiny models' runs."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def model_device(model: nn.Module) -> torch.device:
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
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - began
    del src, dst
    free_memory(device)
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


def percentile(value: float | None, floor: float | None) -> float | None:
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


def pad_id_of(model: nn.Module) -> int:
    pad = model.config.text_config.pad_token_id
    return pad if pad is not None else banned_token_ids(model)[0]


def ordinary_id_range(model: nn.Module) -> tuple[int, int]:
    vocab = model.lm_head.out_features
    return min(100, vocab // 4), min(50000, vocab)  # clear of the special ids at both ends


def bench_inputs(model: nn.Module, text_tokens: int, batch: int = 1, seed: int = 0):
    """(input_ids, attention_mask, pixel_values) on the model's device: BOS, one image's block of image
    tokens, `text_tokens` random ordinary tokens; a random image per row."""
    config, device = model.config, model_device(model)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = ordinary_id_range(model)
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
