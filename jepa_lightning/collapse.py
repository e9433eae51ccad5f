"""Collapse diagnostics for embeddings: watch these, not the loss, to catch a collapse.

Two kinds of collapse, two measures:

* **point collapse** -- every sample maps to (nearly) the same vector. RankMe, computed on
  the *uncentred* embeddings as Garrido et al. (2023) define it, reads ~1 there (one
  direction carries all the energy); a rank of the *centred* embeddings reads the rank of
  whatever noise is left (a point plus isotropic noise reads near full rank), so it cannot
  see this collapse. :func:`spread_share` measures it directly.
* **dimensional collapse** -- samples differ, but only along a few directions: the centred
  rank (:func:`centred_rank`) is low.
"""

from __future__ import annotations

import math

import torch


def _entropy_rank(s: torch.Tensor, eps: float) -> float:
    """exp(entropy) of singular values ``s`` normalised to sum to 1 (plus ``eps``, RankMe)."""
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) of ``z [N, C]``: exp(entropy) of its normalised singular
    values, **uncentred**, as defined in the paper. ~1 for a point or line collapse,
    ``min(N, C)`` for an isotropic spread around the origin."""
    z = z.float()
    if z.shape[0] < 2:
        return float("nan")
    return _entropy_rank(torch.linalg.svdvals(z), eps)


def centred_rank(z: torch.Tensor, eps: float = 1e-7) -> float:
    """The same entropy rank after centring ``z`` on its mean (Roy & Vetterli's effective
    rank of the spread between samples): low = dimensional collapse. Blind to point
    collapse: the noise around a single point reads as a high rank."""
    z = z.float()
    if z.shape[0] < 2:
        return float("nan")
    return _entropy_rank(torch.linalg.svdvals(z - z.mean(0, keepdim=True)), eps)


def spread_share(z: torch.Tensor) -> float:
    """Share of the embeddings' second moment that differs between samples:
    ``trace(Cov z) / mean ||z||^2`` in [0, 1]. 0 = every sample is the same point."""
    z = z.float()
    if z.shape[0] < 2:
        return float("nan")
    second = z.pow(2).sum(1).mean()
    spread = (z - z.mean(0, keepdim=True)).pow(2).sum(1).mean()
    return float(spread / second.clamp_min(1e-12))


def mean_feature_std(z: torch.Tensor) -> float:
    """Mean over channels of the per-channel std of L2-normalised ``z``; ~0 means collapse,
    ~1/sqrt(C) is what a spread-out embedding gives."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return float(z.std(0).mean())


#: below this share of the second moment varying between samples, the samples are one point
POINT_COLLAPSE_SPREAD = 0.01
#: a centred rank below this: the samples vary along about one direction
DIMENSIONAL_COLLAPSE_RANK = 2.0


def collapse_verdict(spread: float, centred: float) -> str:
    """``point collapse``, ``dimensional collapse`` or ``none`` from :func:`spread_share` and
    :func:`centred_rank` (``unknown`` when either is NaN). The spread is checked first:
    a point plus noise has a high centred rank but almost no spread."""
    if spread is None or centred is None or math.isnan(spread) or math.isnan(centred):
        return "unknown"
    if spread < POINT_COLLAPSE_SPREAD:
        return "point collapse"
    if centred < DIMENSIONAL_COLLAPSE_RANK:
        return "dimensional collapse"
    return "none"


def collapse_measures(z: torch.Tensor) -> dict[str, float]:
    """Every measure above of ``z [N, C]``, under the names the tasks log."""
    return {
        "rankme": rankme(z),
        "centred_rank": centred_rank(z),
        "spread_share": spread_share(z),
        "feature_std": mean_feature_std(z),
    }
