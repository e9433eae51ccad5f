"""Issue 24, item 3: folders as PACS exports write them.

Before, a folder holding the thin and the thick reconstruction (and a DICOMDIR) was "mixes 3
DICOM series ... give each its own manifest row", which cannot be followed; a series whose
slices differ in matrix size, pixel spacing or bit depth passed header-only ``validate`` and
failed only when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_modules.readers import BadSampleError, LoadCTd
from data_modules.transforms import CTPreprocess, ct_pipeline, load_volume, volume_item
from data_modules.validate import main as validate
from tests.ct_fixtures import write_manifest
from tests.hospital_export import chest_scan, write_dicom_scan, write_dicomdir

THIN, THICK = "1.2.826.0.1.1", "1.2.826.0.1.2"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pacs")
    scan = chest_scan(shape=(48, 48, 36))
    folder = root / "study"
    study = "1.2.826.0.1"
    rois = write_dicom_scan(folder, scan, series_uid=THIN, study_uid=study, name_prefix="a")
    write_dicom_scan(folder, scan, series_uid=THICK, study_uid=study, slab=4,
                     description="CHEST 5.0 B31f", name_prefix="b")  # fmt: skip
    write_dicomdir(folder)
    write_dicom_scan(root / "thick_only", scan, series_uid=THICK, slab=4)
    return root, rois


def test_thinnest_axial_series_is_read_and_non_images_ignored(export):
    root, _ = export
    img = LoadCTd().load(root / "study")
    assert img.shape == (1, 48, 48, 36)  # the 1.25 mm series, not the 5 mm one
    thick = LoadCTd().load(root / "study", THICK)
    assert thick.shape == (1, 48, 48, 9)
    assert torch.equal(thick, LoadCTd().load(root / "thick_only"))


def test_series_uid_column_picks_the_series_for_the_crop(export):
    root, rois = export
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(12, 12, 12))
    chain = ct_pipeline((12,) * 3, (-1000.0, 400.0), pre)
    picked = load_volume(volume_item(root / "study", rois["lps_mm"], "lps_mm", THICK), chain)
    alone = load_volume(volume_item(root / "thick_only", rois["lps_mm"], "lps_mm"), chain)
    assert torch.equal(picked, alone)
    default = load_volume(volume_item(root / "study", rois["lps_mm"], "lps_mm"), chain)
    assert not torch.equal(default, alone)


def test_validate_says_which_series_it_used_and_what_it_ignored(export, tmp_path, capsys):
    root, _ = export
    rows = [{"image": str(root / "study")},
            {"image": str(root / "study"), "series_uid": THICK, "scan_id": "thick"}]  # fmt: skip
    manifest = write_manifest(tmp_path, rows)
    out_json = tmp_path / "r.json"
    assert validate([str(manifest), "--no-progress", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"holds 2 series: using {THIN} ('CHEST 1.0 B45f', 36 files, 1.25 mm, axial), the " \
           "thinnest axial one unless a series_uid column names another (left: " \
           f"{THICK} ('CHEST 5.0 B31f', 9 files, 5 mm, axial))" in out  # fmt: skip
    assert "ignored 2 non-image file(s) (DICOMDIR, README.TXT)" in out
    report = json.loads(out_json.read_text())
    assert report["dicom_non_image_files_ignored"] == 4  # two rows, the same folder
    assert report["size_voxels"]["z"]["min"] == 9 and report["size_voxels"]["z"]["max"] == 36


@pytest.mark.parametrize(
    ("odd", "message"),
    [
        (
            {"Rows": 24},
            r"different matrix sizes \(Rows x Columns\): 48x48 \(7 slices\), 24x48 \(1 slice, e.g. \d+\)",
        ),
        (
            {"PixelSpacing": [0.5, 0.5]},
            r"different PixelSpacing values \(mm\): 0.8x0.8 \(7 slices\), 0.5x0.5 \(1 slice",
        ),
        (
            {"BitsStored": 12, "HighBit": 11},
            r"different bit depths .*: 16/16/1 \(7 slices\), 16/12/1 \(1 slice, e.g.",
        ),
    ],
)
def test_slices_that_cannot_stack_are_refused_from_the_headers(tmp_path, capsys, odd, message):
    folder = tmp_path / "odd"
    write_dicom_scan(folder, chest_scan(shape=(48, 48, 8)), odd_slice=odd)
    manifest = write_manifest(tmp_path, [{"image": str(folder)}])
    assert validate([str(manifest), "--no-progress"]) == 1  # header-only, no decoding
    out = capsys.readouterr().out
    assert "is not one CT volume" in out and __import__("re").search(message, out), out
    with pytest.raises(BadSampleError, match=message):
        LoadCTd().load(folder)


def test_a_series_uid_that_is_not_there_lists_the_folders_series(export, tmp_path, capsys):
    root, _ = export
    manifest = write_manifest(tmp_path, [{"image": str(root / "study"), "series_uid": "1.2.3"}])
    assert validate([str(manifest), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"study has no series with the manifest's series_uid '1.2.3'; it holds 2: {THIN}" in out
