"""Static decode cache: preallocated KV buffers for attention layers, fixed-size states for mixer layers.

Shapes per decoder layer (B = max batch, S = max sequence length):
- attention: keys and values (B, kv_heads, S, head_dim) in the model dtype;
- mixer: conv window (B, conv_dim, kernel) in the model dtype and SSM state (B, heads, head_dim, state)
  in float32 (a bf16 state loses the slow decays after a few hundred steps).

`EngineCache` answers the calls that the decoder layers make on a transformers cache during decode
(`update` from attention, `get/update_conv_state` and `get/update_recurrent_state` from the mixer), with
in-place writes at a slot held in a device tensor, so one decode step can be captured in a CUDA graph.
A view (`view(batch, kv_len)`) shares the buffers and exposes the first `batch` rows and `kv_len` slots:
attention then reads only the keys that can be valid, not the whole preallocated length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from matvlm.model.mixer import Mamba2Mixer


@dataclass(frozen=True)
class CacheBytes:
    kv: int  # attention keys + values
    mixer: int  # conv windows + SSM states

    @property
    def total(self) -> int:
        return self.kv + self.mixer


@dataclass(frozen=True)
class LayerShapes:
    """What one decoder layer keeps per sequence: ("attention", kv_heads, head_dim) or ("mixer", mixer)."""

    kind: str
    kv_heads: int = 0
    head_dim: int = 0
    mixer: Mamba2Mixer | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llava-style model (teacher or hybrid)."""
    try:
        return model.model.language_model.layers
    except AttributeError as err:
        raise TypeError(
            f"{type(model).__name__} is not a Llava-style model (no model.language_model.layers); the engine runs "
            "LlavaForConditionalGeneration teachers and matvlm hybrids"
        ) from err


def layer_shapes(model: nn.Module) -> list[LayerShapes]:
    """Read the cache geometry from the modules themselves (works for MHA, GQA and mixers alike)."""
    shapes = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        if isinstance(attn, Mamba2Mixer):
            shapes.append(LayerShapes("mixer", mixer=attn))
            continue
        k_proj = getattr(attn, "k_proj", None)
        head_dim = getattr(attn, "head_dim", None)
        if not isinstance(k_proj, nn.Linear) or not head_dim:
            raise TypeError(f"layer {i}: {type(attn).__name__} has no k_proj / head_dim; cannot size its KV cache")
        shapes.append(LayerShapes("attention", kv_heads=k_proj.out_features // head_dim, head_dim=head_dim))
    return shapes


def cache_bytes(model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype | None = None) -> CacheBytes:
    """Bytes of the engine's static cache for `batch` sequences of `seq_len` slots.

    KV: 2 x batch x kv_heads x seq_len x head_dim per attention layer, in `dtype` (default: the model's).
    Mixer: the conv window in `dtype` plus the SSM state in float32, independent of `seq_len`.
    """
    dtype = dtype or next(model.parameters()).dtype
    item = torch.empty((), dtype=dtype).element_size()
    kv = mixer = 0
    for s in layer_shapes(model):
        if s.kind == "attention":
            kv += 2 * batch * s.kv_heads * seq_len * s.head_dim * item
        else:
            m = s.mixer
            mixer += batch * m.conv_dim * m.conv_kernel * item
            mixer += batch * m.num_heads * m.head_dim * m.state_size * 4
    return CacheBytes(kv=kv, mixer=mixer)


class EngineCache:
    """The static cache (or a view of it); see the module docstring."""

    def __init__(self, keys, values, conv, ssm, slot: torch.Tensor):
        self.keys: dict[int, torch.Tensor] = keys
        self.values: dict[int, torch.Tensor] = values
        self.conv: dict[int, torch.Tensor] = conv
        self.ssm: dict[int, torch.Tensor] = ssm
        self.slot = slot  # (rows,) long: where each row's keys and values go this step

    @classmethod
    def allocate(cls, model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype, device) -> EngineCache:
        keys, values, conv, ssm = {}, {}, {}, {}
        for i, s in enumerate(layer_shapes(model)):
            if s.kind == "attention":
                keys[i] = torch.zeros(batch, s.kv_heads, seq_len, s.head_dim, dtype=dtype, device=device)
                values[i] = torch.zeros_like(keys[i])
            else:
                m = s.mixer
                conv[i] = torch.zeros(batch, m.conv_dim, m.conv_kernel, dtype=dtype, device=device)
                ssm[i] = torch.zeros(batch, m.num_heads, m.head_dim, m.state_size, dtype=torch.float32, device=device)
        return cls(keys, values, conv, ssm, torch.zeros(batch, dtype=torch.long, device=device))

    def view(self, batch: int, kv_len: int) -> EngineCache:
        """The first `batch` rows and `kv_len` slots; writes go to the shared buffers."""
        return EngineCache(
            {i: t[:batch, :, :kv_len] for i, t in self.keys.items()},
            {i: t[:batch, :, :kv_len] for i, t in self.values.items()},
            {i: t[:batch] for i, t in self.conv.items()},
            {i: t[:batch] for i, t in self.ssm.items()},
            self.slot[:batch],
        )

    def nbytes(self) -> CacheBytes:
        kv = sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())
        mixer = sum(t.numel() * t.element_size() for d in (self.conv, self.ssm) for t in d.values())
        return CacheBytes(kv=kv, mixer=mixer)

    @torch.no_grad()
    def load_prefill(self, hf_cache, prompt_len: int, row: int = 0) -> None:
        """Copy a transformers `DynamicCache` filled by a prefill of `prompt_len` slots into rows
        [row:row + batch]."""
        for i, k in self.keys.items():
            layer = hf_cache.layers[i]
            end = row + layer.keys.shape[0]
            k[row:end, :, :prompt_len].copy_(layer.keys)
            self.values[i][row:end, :, :prompt_len].copy_(layer.values)
        for i, c in self.conv.items():
            layer = hf_cache.layers[i]
            state = layer.conv_states[0]
            end = row + state.shape[0]
            c[row:end].copy_(state)
            self.ssm[i][row:end].copy_(layer.recurrent_states[0])

    @torch.no_grad()
    def reset_row(self, row: int) -> None:
        """Zero one row's keys, values, conv window and SSM state, so a reused row carries nothing over
        (masked keys are harmless only while they are finite)."""
        for d in (self.keys, self.values, self.conv, self.ssm):
            for t in d.values():
                t[row].zero_()

    # ---- the cache interface the decoder layers call during decode (one token, in place) -------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        # Each row writes at its own slot (rows of a continuous batch are at different lengths).
        where = self.slot.view(-1, 1, 1, 1).expand(key_states.shape[0], k.shape[1], 1, k.shape[3])
        k.scatter_(2, where, key_states.to(k.dtype))
        v.scatter_(2, where, value_states.to(v.dtype))
        return k, v

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv[layer_idx]

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs) -> torch.Tensor:
        return self.conv[layer_idx].copy_(conv_states)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.ssm[layer_idx]

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs) -> torch.Tensor:
        # Stored in float32; the mixer today hands over its new state already cast to the activation dtype.
        return self.ssm[layer_idx].copy_(recurrent_states)
