"""Distillation losses: KL on temperature-softened logits, the layer-wise loss, CE on answer tokens.

The logit losses work from final hidden states and the shared (frozen) lm_head, a chunk of positions at
a time under activation checkpointing, so neither the teacher's nor the student's full-vocabulary fp32
logits are ever materialised for the whole batch (at 51,200 x 1,428 positions that is 290 MB each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_LOSS_FORMS = ("frobenius", "mse")


def logit_losses(
    head: nn.Module,
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    kl_mask: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over positions of KL(teacher || student) (where `kl_mask`) and of CE (where targets != -100).

    student_h, teacher_h: (N, hidden) final hidden states at the positions that predict the next token;
    targets: (N,) next-token ids or -100. Returns unnormalised sums; the caller divides.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = kl_mask | (targets != -100)
    student_h, teacher_h = student_h[keep], teacher_h[keep]
    kl_targets = kl_mask[keep]
    ce_targets = targets[keep]
    kl_total = student_h.new_zeros((), dtype=torch.float32)
    ce_total = student_h.new_zeros((), dtype=torch.float32)
    for start in range(0, student_h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        s, t, m = student_h[rows], teacher_h[rows], kl_targets[rows]
        args = (head, s, t, m, ce_targets[rows], temperature)
        if s.requires_grad:  # recompute the chunk's logits in backward instead of keeping them
            kl, ce = checkpoint(_chunk_logit_losses, *args, use_reentrant=False)
        else:
            kl, ce = _chunk_logit_losses(*args)
        kl_total = kl_total + kl
        ce_total = ce_total + ce
    return kl_total, ce_total


def _chunk_logit_losses(head, s, t, kl_mask, targets, temperature):
    """Summed KL(teacher || student) * T^2 over positions in `kl_mask`, and summed CE, for one chunk."""
    s_logits = head(s).float()
    with torch.no_grad():
        t_logprobs = F.log_softmax(head(t).float() / temperature, dim=-1)
    s_logprobs = F.log_softmax(s_logits / temperature, dim=-1)
    per_position = (t_logprobs.exp() * (t_logprobs - s_logprobs)).sum(-1)
    kl = (per_position * kl_mask).sum() * temperature**2
    ce = F.cross_entropy(s_logits, targets, ignore_index=-100, reduction="sum")
    return kl, ce


def layer_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """Distance between a mixer layer's output and the teacher layer's output on the same input.

    frobenius (as released): the un-squared Frobenius norm over each sequence's valid positions, summed
      over the batch (the caller divides by the number of sequences). Grows with sequence length.
    mse: squared error summed over valid positions, averaged over channels (the caller divides by the
      number of valid tokens): a per-token mean that does not grow with length.
    """
    diff = (student_out.float() - teacher_out.float()) * mask[..., None]
    if form == "frobenius":
        return diff.pow(2).sum(dim=(1, 2)).clamp_min(1e-12).sqrt().sum()
    if form == "mse":
        return diff.pow(2).mean(-1).sum()
    raise ValueError(f"unknown layer loss {form!r}; choose one of {', '.join(LAYER_LOSS_FORMS)}")
