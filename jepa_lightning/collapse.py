"""Collapse diagnostics for embeddings: watch these, not the loss, to catch a collapse."""

from __future__ import annotations

import torch


def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(entropy) of the normalised singular values of centred ``z [N, C]`` (Roy & Vetterli).

    1 means every sample lies on a line (collapse); ``min(N, C)`` means isotropic spread.
    """
    z = z.float()
    if z.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals(z - z.mean(0, keepdim=True))
    p = s / (s.sum() + eps)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_feature_std(z: torch.Tensor) -> float:
    """Mean over channels of the per-channel std of L2-normalised ``z``; ~0 means collapse,
    ~1/sqrt(C) is what a spread-out embedding gives."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return float(z.std(0).mean())
