"""Pure loss functions. Every loss is computed in fp32 whatever the autocast dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_targets(hidden: torch.Tensor) -> torch.Tensor:
    """JEPA targets: target-encoder outputs normalised per token over channels, in fp32,
    with no learnable affine (so the predictor cannot chase a moving scale)."""
    hidden = hidden.float()
    return F.layer_norm(hidden, hidden.shape[-1:])


def latent_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    kind: str = "smooth_l1",
    beta: float = 1.0,
) -> torch.Tensor:
    """Mean per-element regression loss between predicted and target latents ``[B, T, C]``.

    ``weight [B, T]`` (0/1 or soft) removes tokens from the average, e.g. EHR targets whose
    value is missing: predicting the embedding of "missing" teaches nothing. Returns 0
    (with a graph) when nothing is weighted in, so a batch without valid targets is safe.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    elif kind == "l1":
        per = (pred - target).abs()
    elif kind == "l2":
        per = (pred - target) ** 2
    else:
        raise ValueError(f"unknown latent loss {kind!r}: use smooth_l1, l1 or l2")
    per_token = per.mean(-1)
    if weight is None:
        return per_token.mean() if per_token.numel() else pred.sum() * 0.0
    weight = weight.float()
    total = weight.sum()
    if total <= 0:
        return pred.sum() * 0.0
    return (per_token * weight).sum() / total


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the labelled entries only (NaN label = unlabelled)."""
    labelled = ~torch.isnan(labels)
    if not labelled.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[labelled].float(), labels[labelled].float())


def variance_hinge(z: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term on ``z [B, C]``: mean over channels of ``relu(target - std)``.

    Applied to per-sample pooled context embeddings it penalises a batch whose samples all
    look alike, the failure where tokens carry only their position and the latent loss is
    trivially small. Needs ``B >= 2``; returns 0 otherwise.
    """
    if z.shape[0] < 2:
        return z.sum() * 0.0
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(target_std - std).mean()
