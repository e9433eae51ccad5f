"""A volume as stored on disk, read a box at a time: only the voxels a crop needs.

Why: a 96 mm crop of a 512 x 512 x 300 chest CT needs a few percent of its voxels. Reading
and resampling the whole volume first (the generic MONAI chain) cost 6-8 s and ~3.4 GB per
volume (issue 24). Here the header gives the stored affine and shape; :meth:`read_box`
returns HU of a box of stored indices only:

* NIfTI through nibabel's ``ArrayProxy`` slicing (an uncompressed file is memory-mapped; a
  ``.nii.gz`` is decompressed as a stream up to the box's last slice, never held whole),
  the raw int16 values scaled by ``scl_slope``/``scl_inter`` on the box alone;
* a DICOM series by decoding only the slices in the box (pydicom, per-slice rescale),
  after the header checks of :mod:`data_modules.dicom`;
* an Enhanced CT file whole (one file holds every frame), then cut.

Index order is the stored one (:mod:`data_modules.roi`): NIfTI's data array; DICOM
``(column, row, slice)`` with slices in increasing ``InstanceNumber`` (MONAI's
``PydicomReader`` order), so a voxel ROI means the same in both paths.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data_modules.dicom import VolumeHeaders, geometry, read_enhanced_ct
from data_modules.scan_files import BadSampleError, dicom_volume, is_dicom_path

LPS_TO_RAS4 = np.diag([-1.0, -1.0, 1.0, 1.0])


class StoredVolume:
    """Header-level facts of one stored volume and box reads of its voxels (HU, float32)."""

    affine: np.ndarray  # stored voxel index -> RAS mm
    shape: tuple[int, int, int]

    def read_box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """HU of stored indices ``lo <= index < hi`` (per axis), float32 ``(x, y, z)``."""
        raise NotImplementedError

    def foreground_mask(self, threshold_hu: float) -> np.ndarray:
        """Voxels above ``threshold_hu`` (bool, stored shape), read slab by slab so the
        whole volume is never held as floats."""
        raise NotImplementedError


def _box_slices(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


class NiftiVolume(StoredVolume):
    """A NIfTI file through nibabel's ``ArrayProxy`` (no full read)."""

    SLAB = 32  # slices per read in foreground_mask

    def __init__(self, path: Path):
        try:
            self.img = nib.load(str(path))
        except Exception as err:
            raise BadSampleError(
                f"image {path} could not be read as NIfTI ({type(err).__name__}: {err})"
            ) from err
        shape = tuple(int(s) for s in self.img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise BadSampleError(
                f"image {path} has shape {tuple(self.img.shape)}; a 3-D CT volume is required"
            )
        self.path, self.shape = path, shape
        self.extra = (0,) * (len(self.img.shape) - 3)  # a trailing singleton 4th dimension
        self.affine = np.asarray(self.img.affine, dtype=np.float64)
        proxy = self.img.dataobj
        self.slope = float(getattr(proxy, "slope", 1.0))
        self.inter = float(getattr(proxy, "inter", 0.0))

    def _raw(self, slicer: tuple) -> np.ndarray:
        """Stored values (no scaling, the file's dtype) of ``slicer``."""
        proxy = self.img.dataobj
        getter = getattr(proxy, "_get_unscaled", None)  # nibabel >= 3: the unscaled slice
        try:
            if getter is not None:
                return np.asarray(getter(slicer=slicer + self.extra))
            return np.asarray(proxy[slicer + self.extra])  # scaled already
        except Exception as err:  # truncated gzip, short file
            raise BadSampleError(
                f"image {self.path} could not be read as NIfTI ({type(err).__name__}: {err})"
            ) from err

    def _scaled(self, raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.float32)
        if getattr(self.img.dataobj, "_get_unscaled", None) is not None:
            if self.slope != 1.0:
                out *= np.float32(self.slope)
            if self.inter != 0.0:
                out += np.float32(self.inter)
        return out

    def read_box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self._scaled(self._raw(_box_slices(lo, hi)))

    def foreground_mask(self, threshold_hu: float) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=bool)
        for k in range(0, self.shape[2], self.SLAB):
            box = (slice(None), slice(None), slice(k, k + self.SLAB))
            mask[:, :, k : k + self.SLAB] = self._scaled(self._raw(box)) > threshold_hu
        return mask


class DicomSeriesVolume(StoredVolume):
    """A classic DICOM series: headers read once (and checked), slices decoded on demand."""

    def __init__(self, path: Path, headers: VolumeHeaders):
        self.path, self.headers = path, headers
        order = np.argsort([s.number for s in headers.slices], kind="stable")
        self.files = [headers.files[i] for i in order]
        self.slices = [headers.slices[i] for i in order]
        self.shape, _, _ = geometry(headers)  # (columns, rows, slices)
        first, ori = self.slices[0].position, self.slices[0].orientation
        row_mm, col_mm = self.slices[0].pixel_spacing
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1] = ori[:3] * col_mm, ori[3:] * row_mm
        # the step between consecutive InstanceNumbers (checked equal and monotone)
        lps[:3, 2] = (self.slices[-1].position - first) / max(len(self.slices) - 1, 1)
        lps[:3, 3] = first
        self.affine = LPS_TO_RAS4 @ lps

    def _slice_hu(self, k: int, rows: slice, cols: slice) -> np.ndarray:
        import pydicom

        try:
            ds = pydicom.dcmread(self.files[k])
            pixels = ds.pixel_array
        except Exception as err:
            raise BadSampleError(
                f"image {self.path}: DICOM file {self.files[k].name} could not be decoded "
                f"({type(err).__name__}: {err})"
            ) from err
        if pixels.shape != (self.shape[1], self.shape[0]):
            raise BadSampleError(
                f"image {self.path}: DICOM file {self.files[k].name} has {pixels.shape[0]} x "
                f"{pixels.shape[1]} pixels, the series {self.shape[1]} x {self.shape[0]}: "
                "not one volume; re-export the series"
            )
        s = self.slices[k]
        out = pixels[rows, cols].T.astype(np.float32)
        return out * np.float32(s.slope) + np.float32(s.intercept)

    def read_box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        cols, rows = slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))
        planes = [self._slice_hu(k, rows, cols) for k in range(int(lo[2]), int(hi[2]))]
        return np.stack(planes, axis=-1)

    def foreground_mask(self, threshold_hu: float) -> np.ndarray:
        full = slice(None)
        return np.stack(
            [self._slice_hu(k, full, full) > threshold_hu for k in range(self.shape[2])], -1
        )


class EnhancedCTVolume(StoredVolume):
    """An Enhanced CT (multi-frame) file: one file holds every frame, so it is read whole."""

    def __init__(self, path: Path, headers: VolumeHeaders):
        try:
            self.vol, self.affine = read_enhanced_ct(headers.files[0], headers)
        except Exception as err:
            raise BadSampleError(
                f"image {path} could not be read as an Enhanced CT file ({type(err).__name__}: "
                f"{err})"
            ) from err
        self.shape = tuple(int(s) for s in self.vol.shape)

    def read_box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.vol[_box_slices(lo, hi)].astype(np.float32)

    def foreground_mask(self, threshold_hu: float) -> np.ndarray:
        return self.vol > threshold_hu


def open_volume(path: Path, series_uid: str | None = None) -> StoredVolume:
    """The stored volume at ``path`` (in a folder of several DICOM series, the one
    ``series_uid`` names, else the thinnest axial one); every failure a
    :class:`BadSampleError` naming it."""
    if not path.exists():
        raise BadSampleError(f"image {path} does not exist: fix the manifest's 'image' entry")
    if is_dicom_path(path):
        headers = dicom_volume(path, series_uid)  # every header check, no pixels
        if headers.multiframe:
            return EnhancedCTVolume(path, headers)
        return DicomSeriesVolume(path, headers)
    return NiftiVolume(path)
