"""Step-based schedules and the EMA update, as pure functions (unit-tested)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum rising linearly from ``start`` to ``end`` over the optimizer steps."""
    if total_steps <= 0:
        return end
    return start + (end - start) * min(1.0, step / total_steps)


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` in one foreach call."""
    if len(target) != len(online):
        raise ValueError("EMA target and online parameter lists differ in length")
    if target:
        torch._foreach_lerp_(target, online, 1.0 - momentum)
