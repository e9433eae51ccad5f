"""A realistic hospital export, written on the fly: chest CTs as NIfTI and DICOM, as PACS and
research exports give them, with the quirks a new user meets (issue 24).

Small volumes for the default suite, 512 x 512 x 300 for the benchmark
(``experiments/benchmarks/data_cache.py --real-size``). Nothing is downloaded.

The phantom is a chest in world coordinates: air outside, a soft-tissue body (40 HU), two
lungs (-850 HU) and a solid nodule (+40 HU) in the patient's **left** lung, so an ROI read in
the wrong space (LPS as RAS mirrors x and y) lands in the *right* lung's parenchyma. Quirks:

* NIfTI: int16 with ``scl_slope``/``scl_inter``, the array stored in LPS order (an ITK /
  SimpleITK export: a flipped affine), an optional trailing singleton 4th dimension;
* DICOM: one file per slice, without extension, names in random order, signed int16 with a
  per-slice ``RescaleIntercept``, a real CT header (HFS, ``ORIGINAL\\PRIMARY\\AXIAL``);
  optionally several series in one folder (thin + thick reconstructions), a ``DICOMDIR`` and
  non-image files beside them, a slice with another matrix size or bit depth.

Every writer returns the nodule's centre in each ROI space of :mod:`data_modules.roi`
(``ras_mm``, ``lps_mm``, ``voxel`` of the file as stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

LUNG_HU, BODY_HU, AIR_HU, NODULE_HU = -850, 40, -1000, 40


@dataclass
class ChestScan:
    """HU voxels indexed (x, y, z) with ``i`` along RAS +x (towards the patient's right),
    their RAS affine, and the nodule's world centre (RAS mm; x < 0 is the left lung) and
    radius."""

    hu: np.ndarray  # int16 (x, y, z), axis 0 along RAS +x
    affine: np.ndarray  # voxel -> RAS mm
    nodule_ras: np.ndarray
    nodule_radius_mm: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.abs(np.diag(self.affine)[:3]))


def chest_scan(
    shape: tuple[int, int, int] = (96, 96, 40),
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.25),
    seed: int = 0,
    noise_hu: float = 10.0,
    nodule_radius_mm: float | None = None,
) -> ChestScan:
    """A chest phantom of ``shape`` voxels at ``spacing`` mm (x, y, z), centred near the
    scanner's isocentre (as a real FOV is), the nodule in the left lung (RAS x < 0)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    fov = nx * sx
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]
    x = affine[0, 3] + np.arange(nx) * sx
    y = affine[1, 3] + np.arange(ny) * sy
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body_y = 0.03 * fov  # the table lifts the body a little off the isocentre
    plane = np.full((nx, ny), AIR_HU, dtype=np.int16)
    plane[((xx / (0.42 * fov)) ** 2 + ((yy - body_y) / (0.30 * fov)) ** 2) <= 1] = BODY_HU
    lung_a, lung_b = 0.13 * fov, 0.19 * fov
    for side in (-1, 1):
        inside = ((xx - side * 0.19 * fov) / lung_a) ** 2 + ((yy - body_y) / lung_b) ** 2 <= 1
        plane[inside] = LUNG_HU
    hu = np.repeat(plane[:, :, None], nz, axis=2)
    for k0 in range(0, nz, 16):  # noise in slabs: a 512^2 x 300 volume stays int16 in RAM
        slab = hu[:, :, k0 : k0 + 16]
        slab += rng.normal(0, noise_hu, slab.shape).astype(np.int16)
    radius = nodule_radius_mm or max(3.0, 2.5 * max(spacing))
    centre = np.array([-0.19 * fov + 0.02 * fov, body_y + 0.03 * fov, 0.1 * nz * sz])
    vox = (np.linalg.inv(affine) @ np.r_[centre, 1.0])[:3]
    reach = np.ceil(radius / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(np.floor(vox).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(vox).astype(int) + reach + 1, shape)
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    )
    ball = np.linalg.norm((grid - vox) * np.asarray(spacing), axis=-1) <= radius
    hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] = NODULE_HU
    return ChestScan(hu, affine, centre, float(radius))


def roi_spaces(scan: ChestScan, stored_affine: np.ndarray) -> dict[str, tuple[float, ...]]:
    """The nodule centre in each ROI space, ``voxel`` for an array stored with
    ``stored_affine`` (voxel -> RAS mm)."""
    ras = scan.nodule_ras
    vox = (np.linalg.inv(stored_affine) @ np.r_[ras, 1.0])[:3]
    return {
        "ras_mm": tuple(float(v) for v in ras),
        "lps_mm": (float(-ras[0]), float(-ras[1]), float(ras[2])),
        "voxel": tuple(float(v) for v in vox),
    }


def write_nifti_scan(
    path: Path,
    scan: ChestScan,
    lps_storage: bool = True,
    slope: float = 1.0,
    inter: float = -1024.0,
    trailing_dim: bool = False,
) -> dict[str, tuple[float, ...]]:
    """``scan`` as a NIfTI file: int16 ``(HU - inter) / slope`` with scl_slope/scl_inter,
    stored in LPS order (x and y reversed, affine flipped) when ``lps_storage``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data, affine = scan.hu, scan.affine.copy()
    if lps_storage:
        data = data[::-1, ::-1, :]
        nx, ny = data.shape[:2]
        flip = np.eye(4)
        flip[0, 0], flip[1, 1] = -1.0, -1.0
        flip[0, 3], flip[1, 3] = nx - 1, ny - 1
        affine = affine @ flip
    raw = np.rint((data.astype(np.float32) - inter) / slope).astype(np.int16)
    if trailing_dim:
        raw = raw[..., None]
    img = nib.Nifti1Image(raw, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return roi_spaces(scan, affine)


def _ct_dataset(meta, name: str):
    import pydicom
    from pydicom.dataset import FileDataset

    ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom_scan(
    folder: Path,
    scan: ChestScan,
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "CHEST 1.0 B45f",
    name_prefix: str = "",
    odd_slice: dict | None = None,
    slab: int = 1,
) -> dict[str, tuple[float, ...]]:
    """``scan`` as an axial DICOM series in ``folder``: one file per slice named by a random
    number without extension, signed int16 with a per-slice RescaleIntercept.

    ``slab`` > 1 writes a thicker reconstruction (the mean of ``slab`` slices, every
    ``slab``-th position, ``SliceThickness`` scaled). ``odd_slice`` gives one slice other
    header values (``{"Rows": 256}``, ``{"BitsStored": 12}``, ``{"PixelSpacing": [..]}``).
    Returns the ROI spaces; ``voxel`` is (column, row, slice in InstanceNumber order)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    nx, ny, nz = scan.hu.shape
    sx, sy, sz = scan.spacing
    ks = list(range(0, nz - slab + 1, slab))
    # LPS: column c along patient-left (-RAS x), row r along posterior (-RAS y).
    ras_first = scan.affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    origin_lps = np.array([-ras_first[0], -ras_first[1], ras_first[2]])
    names = rng.permutation(10**6)[: len(ks)]
    for n, k in enumerate(ks):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{name_prefix}{names[n]:06d}"
        ds = _ct_dataset(meta, name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.PatientID, ds.PatientPosition = "CT", "ANON", "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription, ds.KVP, ds.ConvolutionKernel = description, 120, "B45f"
        ds.InstanceNumber = n + 1
        z = origin_lps[2] + (k + (slab - 1) / 2) * sz
        ds.ImagePositionPatient = [float(origin_lps[0]), float(origin_lps[1]), float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz * slab)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        intercept = -1024.0 - float(n % 3)  # per-slice rescale, as some scanners write
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, intercept, "HU"
        hu = scan.hu[:, :, k : k + slab].astype(np.float32).mean(axis=2)
        stored = np.rint(hu[::-1, ::-1] - intercept).astype(np.int16)  # (c, r)
        ds.Rows, ds.Columns = ny, nx
        if odd_slice and n == len(ks) // 2:
            for key, value in odd_slice.items():
                setattr(ds, key, value)
            if "Rows" in odd_slice or "Columns" in odd_slice:
                stored = np.zeros((int(ds.Columns), int(ds.Rows)), dtype=np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / name, enforce_file_format=True)
    stored_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(
        [
            [sx, 0, 0, origin_lps[0]],
            [0, sy, 0, origin_lps[1]],
            [0, 0, sz * slab, origin_lps[2] + (slab - 1) / 2 * sz],
            [0, 0, 0, 1],
        ]
    )
    return roi_spaces(scan, stored_affine)


def write_dicomdir(folder: Path) -> Path:
    """A ``DICOMDIR`` (Media Storage Directory, no pixels) and a non-DICOM text file beside
    the series, as a CD/PACS export writes them."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "DICOMDIR"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "EXPORT"
    ds.DirectoryRecordSequence = pydicom.Sequence([])
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)
    (folder / "README.TXT").write_text("exported by PACS\n")
    return folder / "DICOMDIR"


def ehr_extract(scan_ids: list[str], patient_ids: list[str], seed: int = 0) -> dict:
    """Manifest and EHR-table columns as a hospital extract writes them: ISO dates for
    ``scan_time`` (some with a time of day), sex as ``M``/``F``, smoking as text with odd
    case and spaces, ``NA``/``unknown`` for missing, a date-of-diagnosis column."""
    rng = np.random.default_rng(seed)
    n = len(scan_ids)
    days = rng.integers(0, 900, n)
    dates = [
        (np.datetime64("2019-01-01") + int(d)).astype(str) + ("T09:30" if i % 3 == 0 else "")
        for i, d in enumerate(days)
    ]
    return {
        "scan_time": dates,
        "ehr_sex": [["M", "F", " f"][i % 3] for i in range(n)],
        "ehr_smoking": [["current", "Former", "never ", "NA", "unknown"][i % 5] for i in range(n)],
        "ehr_age": [float(40 + i) for i in range(n)],
        "ehr_dx_date": [str(np.datetime64("2015-06-01") + int(d)) for d in days],
    }
