"""Reading one CT volume from disk, with every check of the data contract that needs the file.

A NIfTI file is read through nibabel (reoriented to RAS while reading), a folder holding one
DICOM series through MONAI's ``LoadImage`` (``PydicomReader``) and ``Orientation``, an
Enhanced CT file through :func:`data_modules.dicom.read_enhanced_ct`; each becomes a
``MetaTensor`` with its affine, and every failure is a :class:`BadSampleError` naming the file.
Kept apart from :mod:`data_modules.transforms` (what is done to a volume once read) because
``validate`` and the cache key need the reading and the file stamp without the chain.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, MapTransform, Orientation

from data_modules.dicom import VolumeHeaders, read_enhanced_ct
from data_modules.scan_files import (  # noqa: F401  (re-exported: the readers' errors and checks)
    BadSampleError,
    as_bad_sample,
    dicom_volume,
    file_stamp,
    is_dicom_path,
)
from data_modules.stored_volume import DicomSeriesVolume

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
STORED_AFFINE = "stored_affine"  # meta key: voxel -> RAS mm of the array as stored


class LoadCTd(MapTransform):
    """Reads ``image`` (NIfTI file or DICOM-series folder) into a channel-first MetaTensor
    with the checks of the data contract: file present and readable, 3-D, finite voxels.

    A DICOM folder's series is checked from the headers first (see
    :mod:`data_modules.dicom`: modality, localizers, orientation, slice count, spacing,
    gantry tilt, matrix size and bit depth, decoders) and, in a folder of several, chosen
    (:mod:`data_modules.dicom_series`); its files are decoded with pydicom in InstanceNumber
    order, rescale slope/intercept applied per slice, the affine from the first and last
    ImagePositionPatient — what MONAI's ``PydicomReader`` does for a one-series folder, which
    it cannot do for one series of several (so the checks include that InstanceNumber order
    is the spatial order). An Enhanced CT file (multi-frame), or a folder holding only one,
    is read by :func:`~data_modules.dicom.read_enhanced_ct` into the same layout.
    """

    def __init__(self, keys: str = "image", axcodes: str | None = "RAS"):
        super().__init__(keys)
        # NIfTI: nibabel reads and, for RAS, reorients (``as_closest_canonical``) into a
        # MetaTensor carrying the affine. MONAI's LoadImage + Orientation do the same with
        # ~15 ms more bookkeeping per volume, which would slow the quickstart's 32^3 cohort
        # by a third; DICOM goes through MONAI's LoadImage (PydicomReader) + Orientation.
        self.canonical = axcodes == "RAS"
        self.orient = Orientation(axcodes, labels=RAS_LABELS) if axcodes else None
        self.nifti_orient = None if self.canonical else self.orient

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.load(Path(d[key]), d.get("series_uid"))
        return d

    def read_nifti(self, path: str) -> MetaTensor:
        img = nib.load(path)
        stored = img.affine  # voxel ROIs are indices of the array as stored (data_modules.roi)
        if self.canonical:
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))  # scale slope/intercept applied
        return MetaTensor(
            torch.from_numpy(data),
            affine=torch.as_tensor(img.affine, dtype=torch.float64),
            meta={STORED_AFFINE: np.asarray(stored, dtype=np.float64)},
        )

    def read_enhanced(self, path: Path, headers: VolumeHeaders) -> MetaTensor:
        vol, affine = read_enhanced_ct(path, headers)
        return MetaTensor(
            torch.from_numpy(vol), affine=torch.as_tensor(affine, dtype=torch.float64)
        )

    def read_series(self, path: Path, headers: VolumeHeaders) -> MetaTensor:
        """The chosen series' files only (a folder may hold others, and DICOMDIR), decoded
        slice by slice with pydicom in InstanceNumber order, per-slice rescale applied:
        the array and affine MONAI's ``PydicomReader`` builds for a one-series folder."""
        vol = DicomSeriesVolume(path, headers)
        data = vol.read_box(np.zeros(3, int), np.asarray(vol.shape))
        return MetaTensor(
            torch.from_numpy(data), affine=torch.as_tensor(vol.affine, dtype=torch.float64)
        )

    def load(self, path: Path, series_uid: str | None = None) -> torch.Tensor:
        if not path.exists():
            raise BadSampleError(f"image {path} does not exist: fix the manifest's 'image' entry")
        if is_dicom_path(path):
            # every geometry/modality/decoder check, headers only; picks the series
            headers = dicom_volume(path, series_uid)
            kind, orient = "a DICOM series", self.orient
            if headers.multiframe:
                kind = "an Enhanced CT file"
                target = headers.files[0]

                def loader(_: str) -> MetaTensor:
                    return self.read_enhanced(target, headers)

            else:

                def loader(_: str) -> MetaTensor:
                    return self.read_series(path, headers)
        else:
            loader, kind, orient = self.read_nifti, "NIfTI", self.nifti_orient
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = loader(str(path))
        except Exception as err:  # truncated gzip, bad header, not an image, ...
            cause = err.__cause__ or err
            raise BadSampleError(
                f"image {path} could not be read as {kind} ({type(cause).__name__}: {cause})"
            ) from err
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 3:
            raise BadSampleError(
                f"image {path} has shape {tuple(img.shape)}; a 3-D CT volume is required"
            )
        img = EnsureChannelFirst(channel_dim="no_channel")(img)
        finite = torch.isfinite(img.as_tensor() if hasattr(img, "as_tensor") else img)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            raise BadSampleError(
                f"image {path} has {n_bad} NaN/inf voxels; fix or exclude the scan"
            )
        img = img.float() if img.dtype != torch.float32 else img
        if STORED_AFFINE not in img.meta:  # DICOM: the reader's array, before orientation
            img.meta[STORED_AFFINE] = np.asarray(img.affine, dtype=np.float64)
        return orient(img) if orient is not None else img
