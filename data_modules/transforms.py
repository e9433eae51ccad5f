"""CT preprocessing: MONAI transforms after reading, configured from YAML.

The chain (dictionary transforms on ``{"image": path, "roi": (x, y, z) mm or None, ...}``):

1. :class:`~data_modules.readers.LoadCTd` — a NIfTI file or a DICOM series into a
   ``MetaTensor`` with its affine, reoriented; every failure names the file
   (:mod:`data_modules.readers`);
2. when ``spacing`` is set, MONAI's ``Spacing`` (trilinear, mm);
3. :class:`CropAroundROId` — a ``crop_size`` box centred on the nodule (``roi_x/y/z`` in world
   mm, mapped to voxels through the *current* affine), or on the foreground when the row has
   no ROI; parts outside the scan are padded with ``pad_hu`` (air, -1024 HU);
4. to a plain tensor, transposed to ``[1, D, H, W]`` = ``(z, y, x)``;
5. ``ScaleIntensityRange`` (HU window -> [0, 1], clipped), ``Resize`` to ``image_size``
   (for the default settings this is bit for bit the pre-MONAI-chain output, so the
   quickstart results do not move).

Everything up to here is deterministic and cacheable (RAM or disk, see
:mod:`data_modules.cache`). Train-time augmentation (:class:`CTAugment`: flips, 90° turns in
the axial plane, a small affine, intensity jitter) runs afterwards, per sample, on the
training split only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import (
    BorderPad,
    Compose,
    MapTransform,
    RandAffine,
    RandFlip,
    RandRotate90,
    RandShiftIntensity,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    Transform,
    Transposed,
)
from monai.transforms.utils import generate_spatial_bounding_box

from data_modules.readers import (  # BadSampleError: re-exported, the chain's error
    STORED_AFFINE,
    BadSampleError,  # noqa: F401
    LoadCTd,
    as_bad_sample,
    file_stamp,
)
from data_modules.roi import check_declared, check_roi_inside, roi_to_ras
from data_modules.roi_crop import ReadROICropd

PREPROCESS_VERSION = 3  # bump when the chain changes in a way the config does not show


@dataclass(frozen=True)
class CTPreprocess:
    """The deterministic CT preprocessing, set under ``data.init_args.preprocess``.

    Args:
        orientation: axis codes every volume is reoriented to (``RAS``); ``null`` keeps the
            file's orientation (then crops and flips follow the file's axes).
        spacing: target voxel spacing in mm along (x, y, z); ``null`` keeps each scan's own.
        crop_size: size in voxels (x, y, z), at the target spacing, of the box cut around the
            ROI centre (``roi_x/roi_y/roi_z`` in mm); ``null`` keeps the whole volume.
        roi_fallback: centre of the box when a row has no ROI: ``foreground`` (bounding box of
            voxels above ``foreground_hu``: the body) or ``centre`` (the volume's centre).
        foreground_hu: threshold for the ``foreground`` fallback.
        pad_hu: value of voxels outside the scan (air).
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    crop_size: tuple[int, int, int] | None = None
    roi_fallback: Literal["foreground", "centre"] = "foreground"
    foreground_hu: float = -500.0
    pad_hu: float = -1024.0

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"preprocess.spacing must be 3 positive mm values, got {self.spacing}")
        if self.crop_size is not None and (len(self.crop_size) != 3 or min(self.crop_size) < 1):
            raise ValueError(
                f"preprocess.crop_size must be 3 positive voxel counts, got {self.crop_size}"
            )
        if self.roi_fallback not in ("foreground", "centre"):
            raise ValueError(
                f"preprocess.roi_fallback must be 'foreground' or 'centre', got {self.roi_fallback!r}"
            )


@dataclass(frozen=True)
class CTAugment:
    """Train-time augmentation, set under ``data.init_args.augment`` (off in val/test/predict).

    Args:
        flip_prob: probability of flipping each axis.
        rot90_prob: probability of a random number of 90° turns in the axial (y, x) plane.
        affine_prob: probability of a small random affine (rotation, scaling).
        rotate_deg: largest rotation (degrees) about each axis in the affine.
        scale: largest relative scaling in the affine.
        intensity_shift: largest additive shift of the windowed [0, 1] intensities.
        intensity_prob: probability of the intensity shift.
    """

    flip_prob: float = 0.5
    rot90_prob: float = 0.5
    affine_prob: float = 0.0
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_shift: float = 0.05
    intensity_prob: float = 0.5

    def build(self, image_size: Sequence[int]) -> Compose:
        """Array transforms on ``[1, D, H, W]``; seed them with ``set_random_state``."""
        if self.rot90_prob > 0 and image_size[1] != image_size[2]:
            raise ValueError(
                f"augment.rot90_prob > 0 turns the axial (H, W) plane by 90°, which needs H == W; "
                f"image_size is {list(image_size)}: set rot90_prob: 0 or a square H, W"
            )
        rad = float(np.deg2rad(self.rotate_deg))
        steps = []
        steps += [RandFlip(prob=self.flip_prob, spatial_axis=a) for a in range(3)]
        steps.append(RandRotate90(prob=self.rot90_prob, max_k=3, spatial_axes=(1, 2)))
        if self.affine_prob > 0:
            steps.append(
                RandAffine(
                    prob=self.affine_prob,
                    rotate_range=(rad, rad, rad),
                    scale_range=(self.scale,) * 3,
                    padding_mode="border",
                    mode="bilinear",
                )
            )
        if self.intensity_prob > 0 and self.intensity_shift > 0:
            steps.append(RandShiftIntensity(offsets=self.intensity_shift, prob=self.intensity_prob))
        return Compose(steps)


# --- ROI crop ---------------------------------------------------------------------------------


def roi_voxel_centre(affine: np.ndarray, roi_mm: Sequence[float]) -> np.ndarray:
    """World (mm) -> continuous voxel index through the inverse affine."""
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.r_[roi_mm, 1.0])[:3]


class CropAroundROId(MapTransform):
    """A fixed-size box around the ROI centre (world mm) or, without ROI, the foreground centre.

    MONAI's ``SpatialCrop`` clips a box at the volume's border; the clipped part is put back
    with ``BorderPad`` (constant ``pad_hu``) so the ROI stays at the centre of the output.
    """

    def __init__(
        self,
        keys: str,
        roi_key: str,
        size: Sequence[int],
        fallback: str = "foreground",
        foreground_hu: float = -500.0,
        pad_hu: float = -1024.0,
    ):
        super().__init__(keys)
        self.roi_key, self.size = roi_key, np.asarray(size, dtype=int)
        self.fallback, self.foreground_hu, self.pad_hu = fallback, foreground_hu, pad_hu

    def centre(self, img: torch.Tensor, roi: Any, source: str, space: str = "ras_mm") -> np.ndarray:
        shape = np.asarray(img.shape[1:])
        if roi is not None and np.all(np.isfinite(np.asarray(roi, dtype=float))):
            world = roi_to_ras(roi, space, img.meta.get(STORED_AFFINE))
            centre = roi_voxel_centre(img.affine, world)
            check_roi_inside(centre, shape, roi, space, source)
            return centre
        if self.fallback == "foreground":
            start, end = generate_spatial_bounding_box(img, lambda x: x > self.foreground_hu)
            if np.all(np.asarray(end) > np.asarray(start)):
                return (np.asarray(start) + np.asarray(end) - 1) / 2.0
        return (shape - 1) / 2.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = str(d.get("source", "?"))
            centre = self.centre(img, d.get(self.roi_key), source, d.get("roi_space", "ras_mm"))
            shape = np.asarray(img.shape[1:])
            start = np.rint(centre).astype(int) - self.size // 2
            end = start + self.size
            lo, hi = np.clip(start, 0, shape), np.clip(end, 0, shape)
            out = SpatialCrop(roi_start=lo.tolist(), roi_end=hi.tolist())(img)
            border = np.stack([lo - start, end - hi], 1).reshape(-1)
            if border.any():
                out = BorderPad(border.tolist(), mode="constant", value=self.pad_hu)(out)
            d[key] = out
        return d


class ToPlainTensord(MapTransform):
    """MetaTensor -> contiguous float32 tensor without metadata (small to cache, cheap to collate)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            out = d[key]
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            d[key] = out.to(torch.float32).contiguous()
        return d


# --- the chain ---------------------------------------------------------------------------------


def ct_pipeline(
    image_size: Sequence[int],
    hu_window: Sequence[float] = (-1000.0, 400.0),
    preprocess: CTPreprocess | None = None,
    read: Literal["box", "whole"] = "box",
) -> Compose:
    """The deterministic chain, from ``{"image": path, "roi": ...}`` to ``{"image": [1, D, H, W]}``.

    With a ``crop_size``, ``read="box"`` (default) reads only the stored voxels the crop
    needs and resamples them once (:class:`~data_modules.roi_crop.ReadROICropd`: the same
    crop, a fraction of the time and memory); ``"whole"`` is the generic MONAI chain (read
    all, ``Spacing``, crop), kept as the reference the tests and the benchmark compare to."""
    p = preprocess or CTPreprocess()
    lo, hi = hu_window
    steps: list[Transform] = []
    if p.crop_size is not None and read == "box":  # only the voxels the crop needs
        steps.append(
            ReadROICropd(
                "image",
                "roi",
                p.crop_size,
                p.orientation,
                p.spacing,
                p.roi_fallback,
                p.foreground_hu,
                p.pad_hu,
            )  # fmt: skip
        )
    else:
        steps.append(LoadCTd("image", p.orientation))  # reads, checks, orients
        if p.spacing is not None:
            steps.append(
                Spacingd("image", pixdim=tuple(p.spacing), mode="bilinear", padding_mode="border")
            )
        if p.crop_size is not None:
            steps.append(
                CropAroundROId(
                    "image", "roi", p.crop_size, p.roi_fallback, p.foreground_hu, p.pad_hu
                )
            )
    steps += [
        # Geometry is settled: drop the metadata (MetaTensor bookkeeping costs more than the
        # window and resize themselves on small volumes), go to (z, y, x) = (D, H, W).
        ToPlainTensord("image"),
        Transposed("image", indices=(0, 3, 2, 1)),
        ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        Resized("image", spatial_size=tuple(image_size), mode="trilinear", anti_aliasing=False),
        ToPlainTensord("image"),
    ]
    return Compose(steps)


def pipeline_key(
    image_size: Sequence[int], hu_window: Sequence[float], preprocess: CTPreprocess | None
) -> str:
    """A digest of everything the deterministic chain's output depends on besides the file.

    MONAI's own ``hash_transform`` falls back to transform *class names* when the transforms
    are not JSON-serialisable (they never are), so a changed spacing would read a stale
    cache; we hash the configuration instead.
    """
    cfg = {
        "version": PREPROCESS_VERSION,
        "image_size": [int(s) for s in image_size],
        "hu_window": [float(v) for v in hu_window],
        "preprocess": asdict(preprocess or CTPreprocess()),
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def volume_item(
    path: str | Path,
    roi: Sequence[float] | None = None,
    roi_space: str = "ras_mm",
    series_uid: str | None = None,
) -> dict[str, Any]:
    """The dict the chain reads: the file, its ROI (or None) in ``roi_space`` (see
    :mod:`data_modules.roi`; LPS is turned into RAS here, voxel indices once the file's
    affine is read), the DICOM series to read from a folder of several (None: the
    thinnest axial, :mod:`data_modules.dicom_series`) and its content stamp (for the cache
    key: a re-exported file gets a new cache entry)."""
    roi_t, space = None, "ras_mm"
    if roi is not None and np.all(np.isfinite(np.asarray(roi, dtype=float))):
        space = check_declared(roi_space, str(path)) or "ras_mm"
        if space == "lps_mm":
            roi, space = roi_to_ras(roi, space), "ras_mm"
        roi_t = tuple(float(v) for v in roi)
    return {
        "image": str(path),
        "source": str(path),
        "roi": roi_t,
        "roi_space": space,
        "series_uid": series_uid,
        "stamp": file_stamp(path),
    }


def load_volume(item: Mapping[str, Any], pipeline: Compose) -> torch.Tensor:
    """Run the chain on one item; any failure becomes a :class:`BadSampleError` naming the file."""
    try:
        return pipeline(dict(item))["image"]
    except Exception as err:
        raise as_bad_sample(err, item["source"]) from err
