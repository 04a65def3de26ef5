"""The Mamba-2 state-space scan (SSD) and its one-token step.

Per head h the recurrence is

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        (S_t: headdim x d_state)
    y_t = S_t C_t + D_h * x_t

Shapes used throughout: x (b, l, h, p), dt (b, l, h) already softplus-ed and biased, A (h,) negative,
B and C (b, l, g, n) with h a multiple of g, D (h,), state (b, h, p, n).

`ssd_scan` and `ssd_step` are the one interface the mixer calls. The pure-torch chunked scan here is
the reference backend (CPU, tests, CI); GPU backends plug in behind the same two functions and are
chosen by device, so the CPU path never imports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matvlm.model import kernels

Tensor = torch.Tensor


def _segsum(x: Tensor) -> Tensor:
    """Stable segment sums: out[..., i, j] = sum(x[..., j+1 : i+1]) for i >= j, -inf above the diagonal.

    Built from masked cumulative sums rather than differences of one cumsum, which cancel badly in
    float32 when the decay is strong.
    """
    q = x.shape[-1]
    x = x[..., None].expand(*x.shape, q)  # [..., i, j] = x[..., i]
    strictly_lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


# Kept out of torch.compile graphs (`compile_layers`): inductor (torch 2.13, CPU) fails on this function's
# symbolic chunk shapes once lengths vary ("cannot determine truth value of Relational"). The layer around it
# still compiles; on GPUs the scan is mamba_ssm's kernel anyway.
@torch.compiler.disable
def ssd_chunked_torch(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD in plain torch: O(L * chunk) memory, exact up to float rounding.

    Within a chunk the output is a masked (decayed) attention-like product; across chunks a state of
    size (p, n) per head carries the past. Computes in float32 (or float64 if given) and returns y in
    the dtype of x and the final state in float32/float64.
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"number of heads ({h}) must be a multiple of the number of groups ({g})")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))

    # Pad to whole chunks with dt = 0: a zero step neither decays nor adds, so the final state is exact.
    pad = (-seqlen) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nchunks = x.shape[1] // chunk_size
    if g != h:
        B = B.repeat_interleave(h // g, dim=2)
        C = C.repeat_interleave(h // g, dim=2)

    def chunks(t: Tensor) -> Tensor:
        return t.reshape(b, nchunks, chunk_size, *t.shape[2:])

    xdt = chunks(x * dt[..., None])  # (b, c, q, h, p)
    Bc, Cc = chunks(B), chunks(C)  # (b, c, q, h, n)
    dA = chunks(dt * A).permute(0, 3, 1, 2)  # (b, h, c, q)
    dA_cum = torch.cumsum(dA, dim=-1)

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) xdt_j
    decay = torch.exp(_segsum(dA))  # (b, h, c, q, q)
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cc, Bc) * decay
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)

    # 2. State each chunk adds by its end (starting from zero).
    decay_to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # (b, h, c, q)
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", Bc, decay_to_end, xdt)

    # 3. Carry states across chunks (a small c x c decay matrix instead of a Python loop).
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(dA_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states_in, final_state = states[:, :-1], states[:, -1]

    # 4. What the carried-in state contributes inside each chunk.
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", Cc, states_in, torch.exp(dA_cum))

    y = y.reshape(b, nchunks * chunk_size, h, p)[:, :seqlen]
    if D is not None:
        y = y + x[:, :seqlen] * D.to(dtype)[:, None]
    return y.to(out_dtype), final_state


def ssd_step_torch(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence. x (b, h, p), dt (b, h), B/C (b, g, n), state (b, h, p, n).

    Returns y (b, h, p) in the dtype of x and the new state (float32/float64, like the scan's).
    """
    h, g = x.shape[1], B.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, dt, A, B, C, state = (t.to(dtype) for t in (x, dt, A, B, C, state))
    if g != h:
        B = B.repeat_interleave(h // g, dim=1)
        C = C.repeat_interleave(h // g, dim=1)
    decay = torch.exp(dt * A)[..., None, None]  # (b, h, 1, 1)
    state = state * decay + (x * dt[..., None])[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + x * D.to(dtype)[:, None]
    return y.to(out_dtype), state


def ssd_sequential_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The naive token-by-token recurrence: slow and obviously right. Used to check every backend."""
    b, seqlen, h, p = x.shape
    n = B.shape[-1]
    state = initial_state
    if state is None:
        state = torch.zeros(b, h, p, n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    ys = []
    for t in range(seqlen):
        y, state = ssd_step_torch(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scan a whole sequence; returns (y, final_state in float32). Picks the backend for the device."""
    if kernels.scan_backend(x.device.type) == "mamba_ssm":
        scan = kernels.mamba_chunk_scan()
        init = initial_state.float() if initial_state is not None else None
        y, final_state = scan(
            x, dt, A.float(), B.to(x.dtype), C.to(x.dtype), chunk_size,
            D=D.float() if D is not None else None, initial_states=init, return_final_states=True,
        )
        return y, final_state
    return ssd_chunked_torch(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Advance the recurrence by one token; returns (y, new_state)."""
    return ssd_step_torch(state, x, dt, A, B, C, D)
