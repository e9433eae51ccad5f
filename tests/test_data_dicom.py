"""DICOM series through MONAI's PydicomReader: order, rescale, affine, bad folders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import (
    BadSampleError,
    CTPreprocess,
    LoadCTd,
    ct_pipeline,
    load_volume,
    volume_item,
)
from tests.ct_fixtures import blob_volume, write_dicom_series, write_manifest, write_nifti

pytest.importorskip("pydicom")

SPACING, ORIGIN = (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0)


def _vol():
    rng = np.random.default_rng(0)
    vol = blob_volume(shape=(12, 10, 6), centre_vox=(3, 7, 4)).astype(np.int32)
    return (vol + rng.integers(-40, 40, vol.shape)).astype(np.int16)


def test_series_is_ordered_rescaled_and_placed_in_the_world(tmp_path):
    vol = _vol()
    folder = write_dicom_series(
        tmp_path / "series", vol, SPACING, ORIGIN, slope=2.0, intercept=-1024
    )
    img = LoadCTd(axcodes=None).load(folder)  # as stored, no reorientation
    # Voxels in stored (column i = x, row j = y, slice k) order, slices sorted by position
    # although the file names run backwards, slope and intercept applied (slope 2: +-1 HU).
    np.testing.assert_allclose(img[0].numpy(), vol, atol=1.0)
    # The affine maps voxel (i, j, k) to RAS mm: DICOM's LPS origin + (i sx, j sy, k sz),
    # with x and y negated.
    aff = np.asarray(img.affine)
    for ijk in [(0, 0, 0), (11, 9, 5), (3, 7, 4)]:
        lps = np.asarray(ORIGIN) + np.asarray(ijk) * np.asarray(SPACING)
        ras = aff @ np.r_[ijk, 1.0]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


def test_series_and_equivalent_nifti_give_the_same_tensor(tmp_path):
    vol = _vol()
    folder = write_dicom_series(
        tmp_path / "series", vol, SPACING, ORIGIN, slope=1.0, intercept=-1024
    )
    lps_affine = np.diag([*SPACING, 1.0])
    lps_affine[:3, 3] = ORIGIN
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine
    nii = write_nifti(tmp_path / "same.nii.gz", vol, ras_affine)
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(8, 8, 8))
    roi = (ras_affine @ np.array([3, 7, 4, 1.0]))[:3]
    chain = ct_pipeline((8, 8, 8), (-1000, 400), pre)
    a = load_volume(volume_item(folder, roi), chain)
    b = load_volume(volume_item(nii, roi), chain)
    assert a.shape == (1, 8, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadSampleError, match=r"empty.*without DICOM image files"):
        LoadCTd().load(tmp_path / "empty")


def test_mixed_series_in_one_folder_is_named(tmp_path):
    vol = _vol()
    write_dicom_series(tmp_path / "a", vol, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "b", vol, series_uid="1.2.3.2")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in ("a", "b"):
        for f in (tmp_path / src).iterdir():
            shutil.copy(f, mixed / f"{src}_{f.name}")
    # issue 24: a folder of several series is the common export; a row picks one (a
    # series_uid column, or the thinnest axial: here equal, so the first in file order)
    picked = LoadCTd().load(mixed)
    assert torch.equal(picked, LoadCTd().load(tmp_path / "a"))
    assert torch.equal(LoadCTd().load(mixed, "1.2.3.2"), LoadCTd().load(tmp_path / "b"))
    with pytest.raises(
        BadSampleError, match=r"mixed has no series with the manifest's series_uid '9\.9'; it "
        r"holds 2: 1\.2\.3\.1 \('', 6 files, 2\.5 mm, axial\)"
    ):  # fmt: skip
        LoadCTd().load(mixed, "9.9")


def test_missing_slice_is_named(tmp_path):
    folder = write_dicom_series(tmp_path / "s", _vol(), reverse_names=False)
    (folder / "slice_002.dcm").unlink()
    with pytest.raises(BadSampleError, match="not equally spaced"):
        LoadCTd().load(folder)


def test_datamodule_reads_dicom_rows_and_skips_bad_folders(tmp_path, caplog):
    write_dicom_series(tmp_path / "good", _vol())
    (tmp_path / "empty").mkdir()
    rows = [{"image": "good"}, {"image": "empty"}, {"image": "good", "split": "val"}]
    manifest = write_manifest(tmp_path, rows)
    raising = CTEHRDataModule(str(manifest), image_size=8, batch_size=3, drop_last=False)
    with pytest.raises(BadSampleError, match=r"empty.*scan_id='s1'"):
        raising.setup("fit")
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=3, on_bad_sample="skip",
                         cache_volumes=False, drop_last=False)  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b["scan_id"] for b in batches] == [["s0"]]
    assert "1 bad sample(s) skipped this epoch" in caplog.text and "empty" in caplog.text
