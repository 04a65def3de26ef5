"""Learning-rate schedules and AdamW parameter groups."""

from __future__ import annotations

import math

from torch import nn

# Parameters that never get weight decay besides 1-D tensors (Mamba-2 convention).
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def lr_factor(step: int, total: int, warmup: float = 0.1, decay: float = 0.1, shape: str = "wsd") -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total`.

    wsd: linear warmup over the first `warmup` fraction, constant, then linear decay to 0 over the last
    `decay` fraction. cosine: warmup, then cosine decay to 10% of peak. constant: warmup, then the peak.
    """
    if shape not in ("wsd", "cosine", "constant"):
        raise ValueError(f"unknown schedule {shape!r}; choose wsd, cosine or constant")
    warm_steps = max(1, int(round(warmup * total)))
    if step < warm_steps:
        return (step + 1) / warm_steps
    if shape == "constant":
        return 1.0
    if shape == "wsd":
        decay_steps = max(1, int(round(decay * total)))
        start = total - decay_steps
        return 1.0 if step < start else max(0.0, (total - step) / decay_steps)
    progress = min(1.0, (step - warm_steps) / max(1, total - warm_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (1-D, A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
