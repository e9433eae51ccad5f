"""Pooling a scan's tokens into one feature vector: over every token, or over the tokens at
the crop's centre, where an ROI-centred crop puts the lesion.

Why: a lesion is small. A median 8 mm LIDC nodule in a 48 mm crop at 12 mm patches fills
~2 % of the 8 central tokens and 0.24 % of the crop; the mean of all 64 tokens is mostly
label-independent parenchyma. Measured without any training (random-init ``micro``
encoder, LIDC validation nodules, offline logistic-regression probe, 3 init seeds): all-token
pooling 0.678 ± 0.023 AUROC, central 2³ tokens 0.799 ± 0.008.
"""

from __future__ import annotations

from typing import Literal

import torch

PoolingName = Literal["mean", "center"]
POOLINGS = ("mean", "center")


def center_token_indices(grid: tuple[int, int, int], size: int = 2) -> torch.Tensor:
    """Raster indices of the ``size``³ block of patches at the centre of the patch ``grid``
    (the block nearest the crop centre; clipped to the grid on a small axis)."""
    ranges = []
    for g in grid:
        k = min(size, g)
        start = (g - k) // 2
        ranges.append(torch.arange(start, start + k))
    z, y, x = torch.meshgrid(*ranges, indexing="ij")
    return (z * grid[1] * grid[2] + y * grid[2] + x).reshape(-1)


def pool_tokens(
    tokens: torch.Tensor,
    n_image: int,
    grid: tuple[int, int, int],
    pooling: PoolingName = "mean",
    center_size: int = 2,
) -> torch.Tensor:
    """``[B, N, C] -> [B, C]``: the mean over the tokens that ``pooling`` keeps.

    ``n_image`` is the number of image tokens at the front of ``tokens`` (0 for an EHR-only
    sequence; the EHR tokens follow them). ``mean`` keeps every token. ``center`` keeps the
    ``center_size``³ image tokens at the centre of the grid and every EHR token; it needs the
    whole image grid (``n_image`` equal to the number of patches) and falls back to the mean
    when there is no image token."""
    if pooling == "mean" or n_image == 0:
        return tokens.mean(1)
    if pooling != "center":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    n_patches = grid[0] * grid[1] * grid[2]
    if n_image != n_patches:
        raise ValueError(
            f"center pooling needs every image token ({n_patches}), got {n_image}: pool a "
            "masked view with the mean"
        )
    index = center_token_indices(grid, center_size).to(tokens.device)
    kept = torch.cat([tokens[:, index], tokens[:, n_image:]], dim=1)
    return kept.mean(1)
