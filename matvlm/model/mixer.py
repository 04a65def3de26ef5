"""The Mamba-2 mixer that takes the place of a decoder layer's attention.

Standard Mamba-2 layout, so that stock kernels and serving engines can run it:
`in_proj` rows [z | x | B | C | dt], a depthwise causal `conv1d` over x|B|C, `dt_bias`, `A_log`, `D`,
a gated RMSNorm per group (`norm`, normalise after gating) and `out_proj`.

Its forward has the attention module's call signature (hidden states, position embeddings, attention
mask, cache, **kwargs) and returns (output, None), so the teacher's own decoder layer code runs around it
unchanged. Rotary embeddings and the attention mask are not used: a recurrence is causal by itself.
Padding is handled through `mixer_padding_mask` (batch, seq) that the hybrid model passes down: padded
positions are zeroed before and after the conv, so they add nothing to the state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from matvlm.model import ssd
from matvlm.model.config import MixerSettings


def initial_ssm_values(s: MixerSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's init: dt ~ logU(dt_min, dt_max) stored as softplus^-1 (dt_bias), A ~ U(A_init_range)
    stored as log (A_log). D starts at 1."""
    dt = torch.exp(
        torch.rand(s.num_heads) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min)
    ).clamp(min=s.dt_init_floor)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    A_log = torch.log(torch.empty(s.num_heads).uniform_(*s.A_init_range))
    return dt_bias, A_log


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), per group of `group_size` channels (Mamba-2's norm_before_gate=False)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        y = y.unflatten(-1, (-1, self.group_size))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y.flatten(-2) * self.weight.float()).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, settings: MixerSettings, layer_idx: int):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.hidden_size = settings.hidden_size
        self.num_heads = settings.num_heads
        self.head_dim = settings.head_dim
        self.num_groups = settings.num_groups
        self.state_size = settings.state_size
        self.inner_size = settings.inner_size
        self.conv_dim = settings.conv_dim
        self.conv_kernel = settings.conv_kernel
        self.chunk_size = settings.chunk_size
        if self.num_heads % self.num_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_groups ({self.num_groups})")

        self.in_proj = nn.Linear(self.hidden_size, settings.in_proj_size, bias=settings.in_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel,
            groups=self.conv_dim,
            padding=0,
            bias=settings.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.inner_size, group_size=self.inner_size // self.num_groups, eps=settings.norm_eps)
        self.out_proj = nn.Linear(self.inner_size, self.hidden_size, bias=settings.out_proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        if self.dt_bias.device.type == "meta":
            return
        dt_bias, A_log = initial_ssm_values(self.settings)
        self.dt_bias.copy_(dt_bias)
        self.A_log.copy_(A_log)
        self.D.fill_(1.0)

    def split_in_proj(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> z (inner), xBC (conv_dim), dt (heads)."""
        return torch.split(zxbcdt, [self.inner_size, self.conv_dim, self.num_heads], dim=-1)

    def split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.num_groups * self.state_size
        x, B, C = torch.split(xbc, [self.inner_size, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        B = B.unflatten(-1, (self.num_groups, self.state_size))
        C = C.unflatten(-1, (self.num_groups, self.state_size))
        return x, B, C

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        mixer_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        batch, seqlen, _ = hidden_states.shape
        z, xbc, dt = self.split_in_proj(self.in_proj(hidden_states))
        keep = None
        if mixer_padding_mask is not None:
            keep = mixer_padding_mask[:, -seqlen:, None].to(xbc.dtype)
            xbc = xbc * keep

        # Causal depthwise conv: left context is the cached last inputs, or zeros at the start.
        conv_in = xbc.transpose(1, 2)  # (b, conv_dim, l)
        prev_conv = cache.get_conv_state(self.layer_idx) if cache is not None else None
        if prev_conv is not None:
            context = prev_conv[..., -(self.conv_kernel - 1) :].to(conv_in.dtype)
        else:
            context = conv_in.new_zeros(batch, self.conv_dim, self.conv_kernel - 1)
        full = torch.cat([context, conv_in], dim=-1)
        if cache is not None:
            cache.update_conv_state(full[..., -self.conv_kernel :], layer_idx=self.layer_idx)
        xbc = F.silu(F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        if keep is not None:
            xbc = xbc * keep  # pads stay out of the state: x = B = 0 there

        x, B, C = self.split_xbc(xbc)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        prev_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if prev_state is not None and seqlen == 1:
            y, state = ssd.ssd_step(prev_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D)
            y = y[:, None]
        else:
            y, state = ssd.ssd_scan(x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=prev_state)
        if cache is not None:
            cache.update_recurrent_state(state, layer_idx=self.layer_idx)  # float32: bf16 rounding every step drifts

        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), None

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """Cache bytes this mixer keeps per sequence: conv window plus SSM state."""
        return dtype_bytes * (self.conv_dim * self.conv_kernel + self.num_heads * self.head_dim * self.state_size)
