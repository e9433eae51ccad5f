"""CTAugment on a whole batch with tensor ops, on whatever device the batch is on.

Why: at 128³ the per-sample CPU path (MONAI's RandFlip / RandRotate90 / RandAffine /
RandShiftIntensity in the loader workers) is what limits how fast the loader feeds a GPU;
the same transforms as batched tensor ops run after the batch reached the device
(``LightningDataModule.on_after_batch_transfer``), and the workers only read and collate.

Each transform draws, per sample, the same random quantities MONAI's draws (same
probabilities, same ranges), so the two paths give the same distribution of augmented
volumes (tested statistically):

* ``RandFlip(prob, spatial_axis=a)`` per axis: flip with probability ``flip_prob``;
* ``RandRotate90(prob, max_k=3, spatial_axes=(1, 2))``: with probability ``rot90_prob``,
  ``k`` uniform in {1, 2, 3} turns in the (H, W) plane;
* ``RandAffine(prob, rotate_range=r, scale_range=s, padding_mode="border", bilinear)``: with
  probability ``affine_prob``, angles uniform in [-r, r] about each axis and scale factors
  ``1 + U[-s, s]`` per axis, about the volume centre, border padding;
* ``RandShiftIntensity(offsets=o, prob)``: with probability ``intensity_prob``, add ``U[-o, o]``.

The random quantities are drawn on the CPU from a generator seeded from torch's seed and
the distributed rank (so ``seed_everything`` reproduces a run, and ranks differ), then the
batch is transformed on its own device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from data_modules.transforms import CTAugment


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between two ``[B, ...]`` batches."""
    return torch.where(mask.view(-1, *([1] * (old.ndim - 1))).to(old.device), new, old)


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` angles (radians) about the three spatial axes -> ``[B, 3, 3]`` rotations
    ``R0 R1 R2`` (MONAI's default intrinsic "XYZ" order, its x being the first spatial axis)."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    c, s = cos[:, 0], sin[:, 0]
    rx = mat([[one, zero, zero], [zero, c, -s], [zero, s, c]])
    c, s = cos[:, 1], sin[:, 1]
    ry = mat([[c, zero, s], [zero, one, zero], [-s, zero, c]])
    c, s = cos[:, 2], sin[:, 2]
    rz = mat([[c, -s, zero], [s, c, zero], [zero, zero, one]])
    return rx @ ry @ rz


class BatchAugment:
    """:class:`~data_modules.transforms.CTAugment` for ``image [B, 1, D, H, W]`` batches."""

    def __init__(self, config: CTAugment):
        self.config = config
        self._generator: torch.Generator | None = None
        self._seeded_for: int | None = None

    def generator(self) -> torch.Generator:
        seed = (torch.initial_seed() + 1_000_003 * _distributed_rank()) % (2**63)
        if self._generator is None or self._seeded_for != seed:
            self._generator = torch.Generator().manual_seed(seed)
            self._seeded_for = seed
        return self._generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        c, g, b = self.config, self.generator(), image.shape[0]
        if b == 0:
            return image
        if c.rot90_prob > 0 and image.shape[-1] != image.shape[-2]:
            raise ValueError(
                f"augment.rot90_prob > 0 turns the axial (H, W) plane by 90°, which needs "
                f"H == W; the batch is {list(image.shape[2:])}"
            )

        def coin(p: float) -> torch.Tensor:
            return torch.rand(b, generator=g) < p

        out = image
        for axis in range(3):  # RandFlip per spatial axis
            flip = coin(c.flip_prob)
            if flip.any():
                out = _select(flip, out.flip(2 + axis), out)
        turn = coin(c.rot90_prob)  # RandRotate90: k in {1, 2, 3}
        k = torch.randint(1, 4, (b,), generator=g)
        for turns in (1, 2, 3):
            chosen = turn & (k == turns)
            if chosen.any():
                out = _select(chosen, torch.rot90(out, turns, dims=(3, 4)), out)
        if c.affine_prob > 0:
            apply = coin(c.affine_prob)
            rad = math.radians(c.rotate_deg)
            angles = (torch.rand(b, 3, generator=g) * 2 - 1) * rad
            scales = 1 + (torch.rand(b, 3, generator=g) * 2 - 1) * c.scale
            if apply.any():
                out = _select(apply, self.affine(out, angles, scales), out)
        if c.intensity_prob > 0 and c.intensity_shift > 0:
            shift = (torch.rand(b, generator=g) * 2 - 1) * c.intensity_shift
            shift = torch.where(coin(c.intensity_prob), shift, torch.zeros_like(shift))
            out = out + shift.to(out.device, out.dtype).view(-1, 1, 1, 1, 1)
        return out

    @staticmethod
    def affine(image: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Rotate and scale each volume about its centre (bilinear, border padding).

        As in MONAI's ``RandAffine``, the matrix ``R · diag(scale)`` maps an output voxel's
        offset from the centre to the input offset it samples. ``grid_sample`` works in
        normalised coordinates (offset / half-size per axis) ordered (W, H, D), so the matrix
        is conjugated by the half-sizes and its axes reversed."""
        matrix = rotation_matrices(angles) @ torch.diag_embed(scales)  # on (D, H, W) offsets
        half = torch.tensor(image.shape[2:], dtype=matrix.dtype) / 2
        matrix = matrix * half.view(1, 1, 3) / half.view(1, 3, 1)  # N^-1 A N
        reverse = torch.tensor([2, 1, 0])
        theta = matrix[:, reverse][:, :, reverse]
        theta = torch.cat([theta, torch.zeros(len(theta), 3, 1)], dim=2)
        grid = F.affine_grid(theta.to(image), list(image.shape), align_corners=False)
        return F.grid_sample(
            image, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
