"""CT volume loading and preprocessing.

Loading (nibabel) is ours because every failure must name the file; the intensity and
resizing steps are MONAI's transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange


class BadSampleError(ValueError):
    """One scan cannot be used; the message names the file and what to do."""


def load_ct_volume(path: str | Path) -> np.ndarray:
    """A NIfTI volume in Hounsfield units as float32 ``[D, H, W]`` (z, y, x), RAS-oriented.

    nibabel applies the header's scale slope/intercept. Raises :class:`BadSampleError` for a
    missing or unreadable file, an image that is not 3-D, or non-finite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise BadSampleError(f"image {path} does not exist: fix the manifest's 'image' entry")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # truncated gzip, bad header, not a NIfTI, ...
        raise BadSampleError(
            f"image {path} could not be read as NIfTI ({type(err).__name__}: {err})"
        ) from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadSampleError(f"image {path} has shape {data.shape}; a 3-D CT volume is required")
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise BadSampleError(f"image {path} has {n_bad} NaN/inf voxels; fix or exclude the scan")
    return np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)


def ct_preprocess(
    image_size: Sequence[int], hu_window: Sequence[float] = (-1000.0, 400.0)
) -> Compose:
    """HU window -> [0, 1] (clipped), then trilinear resize to ``image_size`` (D, H, W).

    Works on channel-first ``[1, D, H, W]`` arrays. Spacing-aware resampling and ROI crops
    come with the real-archive preprocessing chain.
    """
    lo, hi = hu_window
    return Compose(
        [
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            Resize(spatial_size=tuple(image_size), mode="trilinear", anti_aliasing=False),
        ]
    )


def preprocess_volume(volume_hu: np.ndarray, transform: Compose) -> torch.Tensor:
    """``[D, H, W]`` HU -> ``[1, *image_size]`` float32 tensor (plain tensor, no metadata)."""
    out = transform(torch.from_numpy(volume_hu)[None])
    if hasattr(out, "as_tensor"):  # MONAI MetaTensor -> plain tensor (cheaper to collate)
        out = out.as_tensor()
    return torch.as_tensor(out, dtype=torch.float32).contiguous()
