"""Distillation logit losses through liger-kernel's fused linear kernels (GPU only).

`fused_logit_losses` has the contract of `losses.logit_losses` (KL(teacher || student) * T^2 summed over
the positions in `kl_mask`, CE summed over targets != -100, gradients to `student_h` only) but never
materialises an (N, vocab) fp32 logits tensor for the student or the teacher: liger projects a chunk of
rows through the lm_head, computes loss and d(loss)/d(hidden) for that chunk in the forward pass, and
keeps only the (N, hidden) input gradient. The chunked path in losses.py bounds memory too, but recomputes
every chunk's logits in backward (activation checkpointing); here they are computed once.

liger functions used (public API, `liger_kernel.transformers.functional`, liger-kernel 0.8.5):
- `liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels,
  jsd_beta, ignore_index, temperature)`. With jsd_beta=0 it is forward KL, sum_v P_t (log P_t - log P_s)
  = KL(teacher || student), both logits divided by T (fp32 log-softmax; bf16 projections are requested
  in fp32 from the GEMM). It divides by the number of non-ignored rows (no 'sum' option), does not apply
  T^2, and takes no bias: we multiply by rows * T^2 and fold a bias into the weight (see `fold_bias`).
- `liger_fused_linear_cross_entropy(input, weight, target, bias, reduction="sum")`: CE on untempered
  logits, ignore_index=-100, bias supported natively.

Both compute the input gradient in the forward and scale it in place by the upstream gradient in backward,
so the returned losses may be backpropagated once (no retain_graph second backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IGNORE_INDEX = -100
_ALIGN = 8  # pad the folded hidden size to a multiple of 8 so bf16 GEMMs keep aligned rows (tensor cores)


def _import_liger() -> tuple[Callable, Callable]:
    """liger's fused linear JSD and CE; ImportError when liger-kernel (or triton) is not installed."""
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_fused_linear_jsd,
    )

    return liger_fused_linear_jsd, liger_fused_linear_cross_entropy


def missing_requirements(device: torch.device | str | None = None) -> list[str]:
    """What stops the liger path here: empty when it can run (on `device`, when given)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    elif device is not None and torch.device(device).type != "cuda":
        missing.append(f"CUDA tensors (got tensors on {torch.device(device)})")
    try:
        _import_liger()
    except ImportError as err:
        missing.append(f"liger-kernel (pip install liger-kernel; import failed: {err})")
    return missing


def liger_available() -> bool:
    """True when CUDA is available and liger-kernel's fused linear losses import."""
    return not missing_requirements()


def fold_bias(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden', weight') with hidden' @ weight'.T == hidden @ weight.T + bias, for kernels without a bias.

    hidden' = [hidden, 1, 0...], weight' = [weight, bias, 0...], zero-padded to a multiple of 8 columns.
    Differentiable w.r.t. `hidden` (the ones column takes no gradient). Without a bias, returns the inputs.
    """
    if bias is None:
        return hidden, weight
    width = weight.shape[1] + 1
    pad = -width % _ALIGN
    ones = hidden.new_ones(hidden.shape[0], 1)
    h_extra = torch.cat([ones, hidden.new_zeros(hidden.shape[0], pad)], dim=1)
    w_extra = torch.cat([bias.to(weight.dtype)[:, None], weight.new_zeros(weight.shape[0], pad)], dim=1)
    return torch.cat([hidden, h_extra], dim=1), torch.cat([weight, w_extra], dim=1)


def fused_logit_losses(
    head: nn.Module,
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    kl_mask: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same sums as `losses.logit_losses`, through liger's fused kernels: (KL * T^2 sum, CE sum), fp32.

    head: the frozen nn.Linear lm_head (bias allowed). student_h, teacher_h: (N, hidden); kl_mask: (N,)
    bool; targets: (N,) ids or -100. `chunk_size` is accepted for a drop-in call and ignored (liger sizes
    its own chunks). Hidden states are cast to the head's dtype (under bf16 autocast the frozen head is
    bf16, so this is the cast nn.Linear would get) and autocast is off inside, so liger sees one dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    missing = missing_requirements(student_h.device)
    if missing:
        raise RuntimeError("fused_logit_losses (logit_impl='liger') needs " + " and ".join(missing))
    if not isinstance(head, nn.Linear):
        raise TypeError(f"fused_logit_losses needs an nn.Linear lm_head, got {type(head).__name__}")
    fused_jsd, fused_ce = _import_liger()

    # Frozen head, teacher without grad: liger then skips the weight gradient entirely.
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else None
    student_h = student_h.to(weight.dtype)
    teacher_h = teacher_h.detach().to(weight.dtype)
    kl_total = student_h.new_zeros((), dtype=torch.float32)
    ce_total = student_h.new_zeros((), dtype=torch.float32)

    with torch.autocast(student_h.device.type, enabled=False):
        kl_mask = kl_mask.bool()
        rows = int(kl_mask.sum())
        if rows:  # liger cannot take zero rows
            s, w = fold_bias(student_h[kl_mask], weight, bias)
            t, _ = fold_bias(teacher_h[kl_mask], weight, bias)
            # Mean over the rows given (no labels -> all rows count): times rows gives the sum.
            mean_kl = fused_jsd(s, w, t, w, shift_labels=None, jsd_beta=0.0, temperature=float(temperature))
            kl_total = mean_kl.float() * (rows * temperature**2)
        ce_rows = targets != IGNORE_INDEX
        if bool(ce_rows.any()):
            ce = fused_ce(student_h[ce_rows], weight, targets[ce_rows], bias, reduction="sum")
            ce_total = ce.float()
    return kl_total, ce_total
