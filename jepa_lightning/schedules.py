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


def warmup_stable_decay(
    step: int,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.2,
    min_ratio: float = 0.0,
) -> float:
    """LR multiplier of the warmup-stable-decay schedule (V-JEPA 2): linear warmup to 1, flat,
    then a linear decay to ``min_ratio`` over the last ``decay_fraction`` of the steps.

    Why: a flat phase means a run can be extended (or cut and cooled down) without the
    whole schedule depending on the planned length, as cosine does."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` -> ``end`` along a half cosine over ``total_steps`` (I-JEPA's weight-decay
    schedule 0.04 -> 0.4); ``end`` after the last step."""
    if total_steps <= 0:
        return end
    progress = min(1.0, max(0.0, step / total_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_init_share(steps: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Share of the random-initial weights left in an EMA target after ``steps`` updates of
    :func:`ema_momentum`: the product of the momenta used so far.

    Why it matters: finetuning starts from the target encoder. 0.996 -> 1 over 400 steps
    leaves 45 % of the random init in it at the end of the run; the schedule should bring
    this under a few percent early (the quickstart: < 5 % by 10 % of the steps)."""
    log_share = 0.0
    for step in range(max(0, steps)):
        m = ema_momentum(step, total_steps, start, end)
        if m <= 0.0:
            return 0.0
        log_share += math.log(m)
    return math.exp(log_share)


def ema_start_for_share(
    total_steps: int, share: float = 0.05, at: float = 0.1, end: float = 1.0, cap: float = 0.996
) -> float:
    """The largest start momentum (at most ``cap``) whose :func:`ema_momentum` schedule leaves
    at most ``share`` of the random init in the target after ``at`` of ``total_steps``.

    Why: a fixed 0.996 is I-JEPA's choice for ~100k steps; a 1k-step run needs ~0.96 for the
    target to have forgotten its random init by the time it matters (bisection, 50 rounds)."""
    steps = max(1, math.ceil(at * total_steps))
    if ema_init_share(steps, total_steps, cap, end) <= share:
        return cap
    lo, hi = 0.0, cap
    for _ in range(50):
        mid = (lo + hi) / 2
        if ema_init_share(steps, total_steps, mid, end) <= share:
            lo = mid
        else:
            hi = mid
    return lo
