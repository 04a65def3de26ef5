"""Teacher -> hybrid: choose mixer layers, build the hybrid, initialise each mixer from its attention.

Initialisation (MaTVLM / MambaInLlama): x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O, with one group
per attention head and state size = head dim, so that at init the mixer computes a decayed,
unnormalised linear attention with the teacher's own projections.

GQA teachers (fewer KV heads): K and V rows are repeated to all heads at init. This keeps the stock
Mamba-2 layout (x and B at full width), so stock kernels and serving engines run the result, and it is
exact at init; the price is a few more parameters than repeating after the conv (MambaInLlama's way),
which also lets the heads drift apart during distillation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from matvlm.model.config import MaTVLMConfig, MixerSettings, check_layer_indices, layer_types_for, mamba_layer_indices
from matvlm.model.mixer import Mamba2Mixer
from matvlm.model.modeling import MaTVLMForConditionalGeneration

CONV_INITS = ("random", "identity")
# Attention modules we know how to read: q/k/v projections plus the output projection's name.
OUT_PROJ_NAMES = ("dense", "o_proj")
SUPPORTED_TEXT_MODELS = ("phi", "llama", "mistral", "qwen2")


def _out_proj(attn: nn.Module) -> nn.Linear:
    for name in OUT_PROJ_NAMES:
        if isinstance(getattr(attn, name, None), nn.Linear):
            return getattr(attn, name)
    raise ValueError(f"{type(attn).__name__} has no output projection named {' or '.join(OUT_PROJ_NAMES)}")


def check_supported_attention(attn: nn.Module, layer_idx: int) -> None:
    missing = [n for n in ("q_proj", "k_proj", "v_proj") if not isinstance(getattr(attn, n, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"layer {layer_idx}: {type(attn).__name__} has no separate {', '.join(missing)}; supported decoder "
            f"families are {', '.join(SUPPORTED_TEXT_MODELS)} (separate q/k/v projections)"
        )
    _out_proj(attn)
    if getattr(attn, "qk_layernorm", False):
        raise ValueError(f"layer {layer_idx}: attention with q/k layer norms cannot initialise a mixer")


def mixer_settings_for(teacher: LlavaForConditionalGeneration, chunk_size: int, conv_kernel: int, bias: bool) -> MixerSettings:
    text = teacher.config.text_config
    attn = teacher.model.language_model.layers[0].self_attn
    heads = text.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or text.hidden_size // heads
    return MixerSettings(
        hidden_size=text.hidden_size,
        num_heads=heads,
        head_dim=head_dim,
        num_groups=heads,
        state_size=head_dim,
        conv_kernel=conv_kernel,
        chunk_size=chunk_size,
        in_proj_bias=bias,
        out_proj_bias=bias,
    )


@torch.no_grad()
def init_mixer_from_attention(mixer: Mamba2Mixer, attn: nn.Module, conv_init: str = "random") -> None:
    """Copy the attention's projections into the mixer (x <- V, B <- K, C <- Q, out <- O).

    Biases are carried over when the mixer has bias slots (z and dt rows get zero bias).
    """
    if conv_init not in CONV_INITS:
        raise ValueError(f"unknown conv_init {conv_init!r}; choose one of {', '.join(CONV_INITS)}")
    heads, head_dim = mixer.num_heads, mixer.head_dim
    if mixer.num_groups != heads or mixer.state_size != head_dim:
        raise ValueError("attention init needs one group per head and state size = head dim")
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, _out_proj(attn)
    kv_heads = k.weight.shape[0] // head_dim
    if q.weight.shape[0] != heads * head_dim or heads % kv_heads:
        raise ValueError(
            f"attention shapes do not fit the mixer: q rows {q.weight.shape[0]}, k rows {k.weight.shape[0]}, "
            f"{heads} heads of {head_dim}"
        )
    repeat = heads // kv_heads

    def to_all_heads(t: torch.Tensor) -> torch.Tensor:
        # Row h*head_dim + p of K/V belongs to KV head h; query head j uses KV head j // repeat.
        return t.unflatten(0, (kv_heads, head_dim)).repeat_interleave(repeat, dim=0).flatten(0, 1)

    inner, gn = mixer.inner_size, mixer.num_groups * mixer.state_size
    rows = {"x": slice(inner, 2 * inner), "B": slice(2 * inner, 2 * inner + gn), "C": slice(2 * inner + gn, 2 * inner + 2 * gn)}
    sources = {"x": (v, True), "B": (k, True), "C": (q, False)}
    for part, (proj, repeat_rows) in sources.items():
        w = to_all_heads(proj.weight) if repeat_rows else proj.weight
        mixer.in_proj.weight[rows[part]] = w.to(mixer.in_proj.weight.dtype)
    mixer.out_proj.weight.copy_(o.weight)

    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias.zero_()
        for part, (proj, repeat_rows) in sources.items():
            if proj.bias is not None:
                mixer.in_proj.bias[rows[part]] = to_all_heads(proj.bias) if repeat_rows else proj.bias
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(o.bias if o.bias is not None else torch.zeros_like(mixer.out_proj.bias))

    if conv_init == "identity":
        # Pass-through conv: only the current token's tap is 1 (SiLU still follows).
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.zero_()


def choose_layers(
    num_layers: int, ratio: float | None, placement: str, mamba_layers: list[int] | None
) -> list[int]:
    if mamba_layers is not None:
        if ratio is not None:
            raise ValueError("give either ratio (with placement) or an explicit layer list, not both")
        return check_layer_indices(list(mamba_layers), num_layers)
    if ratio is None:
        raise ValueError("give a ratio in (0, 1) or an explicit list of mixer layers")
    return mamba_layer_indices(num_layers, ratio, placement)


def to_hybrid(
    teacher: LlavaForConditionalGeneration,
    ratio: float | None = None,
    placement: str = "even",
    mamba_layers: list[int] | None = None,
    *,
    attn_bias: bool = False,
    conv_init: str = "random",
    chunk_size: int = 256,
    conv_kernel: int = 4,
    seed: int | None = 0,
    ranking: "str | dict | None" = None,
) -> MaTVLMForConditionalGeneration:
    """Build a hybrid from a Llava teacher; the teacher is left unchanged.

    Every parameter outside the mixers is a bit-identical copy of the teacher's. Defaults follow the
    released MaTVLM setup (attention biases dropped, random conv); `attn_bias` and `conv_init` are
    init variants. `placement` "auto" (or "auto:<measure>") takes the layers from `ranking`, a
    `matvlm rank-layers` file of this teacher.
    """
    if not isinstance(teacher, LlavaForConditionalGeneration):
        raise TypeError(f"teacher must be a LlavaForConditionalGeneration, got {type(teacher).__name__}")
    if getattr(teacher.config, "mamba_layers", None):
        raise ValueError(f"teacher is already a hybrid (mixer layers {teacher.config.mamba_layers})")
    text = teacher.config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(
            f"unsupported decoder {text.model_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    if mamba_layers is None and ratio is not None and placement.startswith("auto"):
        from matvlm.distill.placement import parse_auto, pick_layers  # ranked placement lives with the distillation tools

        mamba_layers, ratio = pick_layers(ranking, teacher, ratio, parse_auto(placement)), None
    layers = choose_layers(text.num_hidden_layers, ratio, placement, mamba_layers)
    teacher_layers = teacher.model.language_model.layers
    for i in layers:
        check_supported_attention(teacher_layers[i].self_attn, i)

    settings = mixer_settings_for(teacher, chunk_size, conv_kernel, attn_bias)
    cfg = teacher.config.to_dict()
    cfg.pop("model_type", None)
    cfg["text_config"]["layer_types"] = layer_types_for(text.num_hidden_layers, layers)
    cfg["mamba_config"] = settings.to_dict()
    cfg["lm_head_bias"] = bool(getattr(teacher.config, "lm_head_bias", False))
    config = MaTVLMConfig(**cfg)
    config._attn_implementation = teacher.config._attn_implementation

    if seed is not None:
        torch.manual_seed(seed)
    param = next(teacher.parameters())
    with torch.device(param.device):  # build where the teacher lives: a 3B random init on the CPU takes minutes
        student = MaTVLMForConditionalGeneration._from_config(config, dtype=param.dtype)

    mixer_prefixes = tuple(f"model.language_model.layers.{i}.self_attn." for i in layers)
    teacher_state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(mixer_prefixes)}
    missing, unexpected = student.load_state_dict(teacher_state, strict=False)
    missing = [k for k in missing if not k.startswith(mixer_prefixes)]
    if missing or unexpected:
        raise RuntimeError(f"teacher and hybrid disagree: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for i, mixer in student.mixers().items():
        init_mixer_from_attention(mixer, teacher_layers[i].self_attn, conv_init)
    student.generation_config = teacher.generation_config
    return student.train(teacher.training)


@dataclass
class ConversionSummary:
    num_layers: int
    mixer_layers: list[int]
    params_removed: int
    params_added: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    mixer_state_bytes: int  # fixed, per sequence

    def cache_bytes(self, tokens: int) -> tuple[int, int]:
        """Cache bytes of one sequence of `tokens` tokens before and after conversion."""
        before = self.kv_bytes_per_token_before * tokens
        after = self.kv_bytes_per_token_after * tokens + self.mixer_state_bytes
        return before, after


def summarize_conversion(
    teacher: LlavaForConditionalGeneration, student: MaTVLMForConditionalGeneration, dtype_bytes: int = 2
) -> ConversionSummary:
    """Parameters and cache sizes before and after (cache in `dtype_bytes` per element, bf16 = 2)."""
    text = teacher.config.text_config
    layers = student.config.mamba_layers
    attn_layers = teacher.model.language_model.layers
    removed = sum(p.numel() for i in layers for p in attn_layers[i].self_attn.parameters())
    mixers = student.mixers()
    added = sum(p.numel() for m in mixers.values() for p in m.parameters())
    head_dim = getattr(attn_layers[0].self_attn, "head_dim", text.hidden_size // text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_layer = 2 * kv_heads * head_dim * dtype_bytes
    n = text.num_hidden_layers
    return ConversionSummary(
        num_layers=n,
        mixer_layers=list(layers),
        params_removed=removed,
        params_added=added,
        kv_bytes_per_token_before=n * per_layer,
        kv_bytes_per_token_after=(n - len(layers)) * per_layer,
        mixer_state_bytes=sum(m.state_bytes(dtype_bytes) for m in mixers.values()),
    )
