"""Issue 24, item 1: the ROI's coordinate space is declared, never guessed.

Before, ``roi_x/y/z`` were read as world RAS mm whatever they were: nodule centres from a
DICOM tool (LPS) cropped the other lung and ``validate`` said OK. Now a manifest with ROI
centres must declare ``roi_space`` (column or argument), each space crops the nodule, and
``validate --decode`` reports centres in air, lung or outside the body.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.dataset import volume_items
from data_modules.manifest import ManifestError
from data_modules.transforms import CTPreprocess, ct_pipeline, load_volume, volume_item
from data_modules.validate import main as validate
from tests.ct_fixtures import write_manifest
from tests.hospital_export import (
    LUNG_HU,
    NODULE_HU,
    chest_scan,
    write_dicom_scan,
    write_nifti_scan,
)

WINDOW = (-1000.0, 400.0)
PRE = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(9, 9, 9))


def centre_hu(vol) -> float:
    """HU at the centre voxel of a windowed [1, 9, 9, 9] crop."""
    return float(vol[0, 4, 4, 4]) * (WINDOW[1] - WINDOW[0]) + WINDOW[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("export")
    scan = chest_scan()
    rois = {
        "nifti": write_nifti_scan(root / "ct.nii.gz", scan, trailing_dim=True),
        "dicom": write_dicom_scan(root / "series", scan),
    }
    return root, rois


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
@pytest.mark.parametrize("space", ["ras_mm", "lps_mm", "voxel"])
def test_each_declared_space_crops_the_nodule(export, fmt, space):
    root, rois = export
    path = root / ("ct.nii.gz" if fmt == "nifti" else "series")
    out = load_volume(
        volume_item(path, rois[fmt][space], space), ct_pipeline((9,) * 3, WINDOW, PRE)
    )
    assert centre_hu(out) == pytest.approx(NODULE_HU, abs=5)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_lps_centre_read_as_ras_is_the_other_lung(export, fmt):
    """The bug the declaration prevents: the same numbers in the wrong space land in the
    right lung's parenchyma, a crop without the nodule."""
    root, rois = export
    path = root / ("ct.nii.gz" if fmt == "nifti" else "series")
    chain = ct_pipeline((9,) * 3, WINDOW, PRE)
    out = load_volume(volume_item(path, rois[fmt]["lps_mm"], "ras_mm"), chain)
    assert centre_hu(out) == pytest.approx(LUNG_HU, abs=60)


def _manifest(root: Path, rois: dict, space_column: list | None, name="m.csv") -> Path:
    rows = []
    for i, fmt in enumerate(["nifti", "dicom"]):
        roi = rois[fmt]["lps_mm"]
        row = {"image": "ct.nii.gz" if fmt == "nifti" else "series", "scan_id": f"s{i}"}
        row.update(roi_x=roi[0], roi_y=roi[1], roi_z=roi[2])
        if space_column is not None:
            row["roi_space"] = space_column[i]
        rows.append(row)
    return write_manifest(root, rows, name=name)


def test_roi_without_declared_space_is_refused(export, capsys):
    root, rois = export
    manifest = _manifest(root, rois, None, "undeclared.csv")
    dm = CTEHRDataModule(str(manifest), image_size=9, preprocess=PRE, batch_size=2)
    with pytest.raises(ManifestError, match=r"2 row\(s\) have roi_x/roi_y/roi_z but no "
                       r"coordinate space.*'roi_space' column.*lps_mm = world mm as a DICOM"):  # fmt: skip
        dm.setup("fit")
    assert validate([str(manifest), "--no-progress"]) == 1
    assert "but no coordinate space" in capsys.readouterr().out


def test_declared_space_by_argument_or_column_crops_the_nodule(export):
    root, rois = export
    by_column = _manifest(root, rois, ["LPS_mm", "lps_mm"], "column.csv")
    undeclared = _manifest(root, rois, None, "argument.csv")
    for manifest, arg in ((by_column, None), (undeclared, "lps_mm")):
        dm = CTEHRDataModule(
            str(manifest), image_size=9, preprocess=PRE, batch_size=2, roi_space=arg
        )
        for item in volume_items(dm.load_table()):  # the rows as setup reads them
            out = load_volume(item, dm.pipeline())
            assert centre_hu(out) == pytest.approx(NODULE_HU, abs=5)


def test_bad_or_contradicting_space_names_the_row(export):
    root, rois = export
    bad = _manifest(root, rois, ["ras_mm", "dicom"], "bad.csv")
    with pytest.raises(ManifestError, match=r"row 1 .*roi_space 'dicom' is not one of"):
        CTEHRDataModule(str(bad), image_size=9, preprocess=PRE).setup("fit")
    both = _manifest(root, rois, ["lps_mm", "ras_mm"], "both.csv")
    with pytest.raises(ManifestError, match=r"row 1 .*contradicts the declared roi_space 'lps_mm'"):
        CTEHRDataModule(str(both), image_size=9, preprocess=PRE, roi_space="lps_mm").setup("fit")
    with pytest.raises(ValueError, match="roi_space 'LAS' is not one of"):
        CTEHRDataModule(str(both), roi_space="LAS")


def test_validate_decode_catches_lps_declared_as_ras(export, tmp_path, capsys):
    root, rois = export
    manifest = _manifest(root, rois, ["ras_mm", "ras_mm"], "wrong.csv")
    out_json = tmp_path / "r.json"
    assert validate([str(manifest), "--no-progress"]) == 0  # the headers cannot tell
    code = validate([str(manifest), "--no-progress", "--decode", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 1
    assert text.count("lung parenchyma") == 2, text
    assert "read as lps_mm it would be at 40 HU (tissue): the manifest's roi_space is probably " \
           "wrong, set it to lps_mm" in text  # fmt: skip
    report = json.loads(out_json.read_text())
    assert report["rois_checked"] == 2 and report["n_problems"] == 2


def test_validate_decode_reports_air_and_outside_the_body(export, capsys):
    root, rois = export
    scan_ok = rois["nifti"]["ras_mm"]
    rows = [
        {"image": "ct.nii.gz", "scan_id": "ok", "roi_x": scan_ok[0], "roi_y": scan_ok[1],
         "roi_z": scan_ok[2]},
        {"image": "ct.nii.gz", "scan_id": "corner", "roi_x": 36.0, "roi_y": 36.0, "roi_z": 0.0},
        {"image": "ct.nii.gz", "scan_id": "lung", "roi_x": 16.0, "roi_y": 12.0, "roi_z": 0.0},
    ]  # fmt: skip
    manifest = write_manifest(root, rows, name="where.csv")
    code = validate([str(manifest), "--no-progress", "--decode", "--roi-space", "ras_mm"])
    text = capsys.readouterr().out
    assert code == 0, text  # warnings: a nodule may be ground glass; the user decides
    assert "scan_id='corner'): ROI centre (36.0, 36.0, 0.0) (ras_mm) is at -1000 HU, outside " \
           "the body" in text  # fmt: skip
    assert re.search(r"scan_id='lung'\): ROI centre \(16.0, 12.0, 0.0\) \(ras_mm\) is at -8\d\d HU, "
                     "in lung parenchyma; a nodule centre is usually above -500 HU", text)  # fmt: skip
    assert "lung parenchyma" in text and "scan_id='ok'" not in text
    assert np.isfinite(scan_ok).all()


def test_a_cohort_written_before_roi_space_loads_through_the_cli_default(cohort_copy):
    """A synthetic cohort generated before the ``roi_space`` column existed: its data module
    declares the generator's space even when the CLI passes ``roi_space=None`` explicitly
    (a YAML that leaves the key out), instead of refusing every row."""
    import pandas as pd

    from data_modules.synthetic import SyntheticCohortDataModule
    from tests.conftest import TINY

    manifest = cohort_copy / "manifest.parquet"
    pd.read_parquet(manifest).drop(columns=["roi_space"], errors="ignore").to_parquet(manifest)
    dm = SyntheticCohortDataModule(
        root=str(cohort_copy), **TINY, image_size=16, batch_size=4, num_workers=0, roi_space=None
    )
    dm.setup("fit")
    assert len(dm.dataset("train")) > 0
