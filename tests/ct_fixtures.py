"""Tiny CT fixtures written on the fly: NIfTI volumes with known geometry, DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


def blob_volume(shape=(20, 24, 16), centre_vox=(12, 9, 5), radius=2.0, bg=-900.0, fg=300.0):
    """An (x, y, z) HU volume: background ``bg`` with a ball of ``fg`` around ``centre_vox``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = np.linalg.norm(idx - np.asarray(centre_vox), axis=-1)
    return np.where(dist <= radius, fg, bg).astype(np.int16)


def write_nifti(path: Path, vol: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(vol, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def world_of(affine: np.ndarray, vox) -> np.ndarray:
    return (affine @ np.r_[np.asarray(vox, float), 1.0])[:3]


def write_manifest(root: Path, rows: list[dict], name="manifest.csv", n_ehr=2) -> Path:
    """A manifest with defaults filled in (patient = scan, train split, ``n_ehr`` features)."""
    full = []
    for i, r in enumerate(rows):
        base = {"patient_id": f"p{i}", "scan_id": f"s{i}", "label": i % 2, "split": "train"}
        base.update({f"ehr_f{j}": float(i + j) for j in range(n_ehr)})
        base.update(r)
        full.append(base)
    path = root / name
    df = pd.DataFrame(full)
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path, index=False)
    return path


def write_dicom_series(
    folder: Path,
    vol_xyz: np.ndarray,
    spacing=(0.7, 0.8, 2.5),
    origin=(-10.0, 20.0, 30.0),
    slope=2.0,
    intercept=-1024.0,
    series_uid: str | None = None,
    reverse_names: bool = True,
) -> Path:
    """Axial slices of ``vol_xyz`` (HU) as a DICOM series (LPS patient coordinates).

    Stored values are ``(HU - intercept) / slope`` as uint16, so the reader must apply the
    rescale; file names run opposite to the slice order, so it must sort by position.
    Voxel (i, j, k) of ``vol_xyz`` sits at LPS ``origin + (i*sx, j*sy, k*sz)``.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    nx, ny, nz = vol_xyz.shape
    stored = np.rint((vol_xyz.astype(np.float64) - intercept) / slope).astype(np.uint16)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"slice_{(nz - 1 - k) if reverse_names else k:03d}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame_uid,
        )
        ds.Modality = "CT"
        ds.PatientID = "synthetic"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            float(origin[0]),
            float(origin[1]),
            float(origin[2] + k * spacing[2]),
        ]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [
            float(spacing[1]),
            float(spacing[0]),
        ]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def nifti_archive(
    root: Path,
    n_train: int = 12,
    n_val: int = 6,
    n_test: int = 6,
    shape=(16, 16, 12),
    name: str = "manifest.parquet",
    seed: int = 0,
) -> Path:
    """A small NIfTI archive (no synthetic-cohort generator involved): blob volumes whose ball
    is bright for label 1, ``n_*`` scans per split, two EHR columns, both cohorts in test."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    rows = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for i, split in enumerate(splits):
        label = i % 2
        centre = [int(rng.integers(4, s - 4)) for s in shape]
        vol = blob_volume(shape, centre, radius=3.0, fg=300.0 if label else -100.0)
        vol = (vol + rng.integers(-30, 30, vol.shape)).astype(np.int16)
        write_nifti(root / "img" / f"{i:03d}.nii.gz", vol, affine)
        rows.append(
            {
                "patient_id": f"P{i:03d}",
                "scan_id": f"S{i:03d}",
                "image": f"img/{i:03d}.nii.gz",
                "label": float(label),
                "split": split,
                "cohort": "external" if split == "test" and i % 3 == 0 else "internal",
                "ehr_age": float(50 + i),
                "ehr_crp": float(rng.normal(label, 1.0)),
            }
        )
    path = root / name
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path, index=False)
    return path
