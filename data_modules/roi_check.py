"""Where each ROI centre lands in its decoded scan: ``validate --decode``'s density check.

Why: a declared but wrong ``roi_space`` (or a wrong sign, or a centre from another scan of the
patient) still gives a crop of the right size, so nothing fails and training runs on crops
without the nodule. A nodule centre sits in soft tissue (above about -500 HU); a centre in
air, in lung parenchyma or outside the body is the symptom. Reading the centre once more
with x and y mirrored (the LPS <-> RAS confusion) tells whether the declared space is the
likely cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_modules.readers import STORED_AFFINE
from data_modules.roi import LPS_TO_RAS, roi_to_ras
from data_modules.transforms import roi_voxel_centre

AIR_HU = -900.0  # below: air (outside the body, airway)
LUNG_HU = -500.0  # below: lung parenchyma; a nodule centre is above
BODY_HU = -500.0  # a ray from the centre that meets nothing above this left the body


@dataclass
class ROIDensity:
    """The HU at an ROI centre (median of its 3x3x3 voxels) and where that is."""

    hu: float
    where: str  # "in tissue", "in lung parenchyma", "in air", "outside the body" / "the scan"

    @property
    def suspicious(self) -> bool:
        return self.where != "in tissue"


def _inside(vox: np.ndarray, shape: Sequence[int]) -> bool:
    return bool(np.all(vox >= -0.5) and np.all(vox <= np.asarray(shape) - 0.5))


def _leaves_body(vol: np.ndarray, ijk: tuple[int, int, int]) -> bool:
    """Whether a ray from ``ijk`` along +-x or +-y (in the axial plane) meets no voxel above
    :data:`BODY_HU` before it leaves the scan: the point is outside the body's outline.
    Lung parenchyma is enclosed by the chest wall, so every ray from it meets tissue."""
    i, j, k = ijk
    plane = vol[:, :, k]
    rays = (plane[i + 1 :, j], plane[:i, j], plane[i, j + 1 :], plane[i, :j])
    return any(not np.any(r > BODY_HU) for r in rays)


def density_at(vol: np.ndarray, affine: np.ndarray, world_ras: np.ndarray) -> ROIDensity:
    """Where ``world_ras`` (mm) falls in ``vol`` (x, y, z HU array with RAS ``affine``)."""
    vox = roi_voxel_centre(affine, world_ras)
    if not _inside(vox, vol.shape):
        return ROIDensity(float("nan"), "outside the scan")
    ijk = tuple(int(v) for v in np.clip(np.rint(vox), 0, np.asarray(vol.shape) - 1))
    lo = [max(c - 1, 0) for c in ijk]
    hu = float(np.median(vol[lo[0] : ijk[0] + 2, lo[1] : ijk[1] + 2, lo[2] : ijk[2] + 2]))
    if hu < LUNG_HU and _leaves_body(vol, ijk):
        return ROIDensity(hu, "outside the body")
    if hu < AIR_HU:
        return ROIDensity(hu, "in air")
    if hu < LUNG_HU:
        return ROIDensity(hu, "in lung parenchyma")
    return ROIDensity(hu, "in tissue")


def check_roi(img: torch.Tensor, roi: Sequence[float], space: str) -> tuple[str | None, bool]:
    """A message about an ROI centre that is not in tissue, or None; and whether the mirrored
    reading (LPS <-> RAS) would be in tissue (then the declared space is likely wrong).

    ``img`` is a decoded ``[1, x, y, z]`` MetaTensor in HU with its RAS affine (and the stored
    affine in its meta, for voxel ROIs)."""
    vol = np.asarray(img[0].detach().cpu().numpy())
    affine = np.asarray(img.affine, dtype=np.float64)
    world = roi_to_ras(roi, space, img.meta.get(STORED_AFFINE))
    found = density_at(vol, affine, world)
    if not found.suspicious:
        return None, False
    where = f"at {found.hu:.0f} HU, {found.where}" if np.isfinite(found.hu) else found.where
    msg = (
        f"ROI centre {tuple(round(float(v), 1) for v in roi)} ({space}) is {where}; a nodule "
        f"centre is usually above {LUNG_HU:.0f} HU"
    )
    if space == "voxel":
        return msg + ": check the indices and the roi_space", False
    other = "lps_mm" if space == "ras_mm" else "ras_mm"
    mirrored = density_at(vol, affine, LPS_TO_RAS @ world)
    if not mirrored.suspicious:
        return (
            msg + f"; read as {other} it would be at {mirrored.hu:.0f} HU (tissue): the "
            f"manifest's roi_space is probably wrong, set it to {other}",
            True,
        )
    return msg + ": check roi_space and that the centre belongs to this scan", False
