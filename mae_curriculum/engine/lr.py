"""Learning rate as a pure function of training progress (fraction of the budget, in [0, 1])."""

from __future__ import annotations

import math


def lr_at(progress: float, base_lr: float, min_lr: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of progress, then half-cycle cosine down to ``min_lr``."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return base_lr * p / warmup
    t = (p - warmup) / max(1e-12, 1.0 - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
