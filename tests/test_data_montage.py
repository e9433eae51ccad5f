"""Issue 24, item 7: a PNG montage of preprocessed samples, the ROI marked, so a user checks
the crops before training (``python -m data_modules.montage``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from data_modules.montage import main as montage
from data_modules.montage import preprocess_with_roi
from data_modules.transforms import CTPreprocess, ct_pipeline, volume_item
from tests.ct_fixtures import write_manifest
from tests.hospital_export import NODULE_HU, chest_scan, write_dicom_scan, write_nifti_scan


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("montage")
    scan = chest_scan()
    return root, {"nifti": write_nifti_scan(root / "ct.nii.gz", scan),
                  "dicom": write_dicom_scan(root / "series", scan)}  # fmt: skip


@pytest.mark.parametrize("crop", [None, (24, 24, 16)])
def test_roi_mark_lands_on_the_nodule(export, crop):
    root, rois = export
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=crop)
    window = (-1000.0, 400.0)
    chain = ct_pipeline((20, 32, 32), window, pre)
    vol, roi = preprocess_with_roi(
        volume_item(root / "series", rois["dicom"]["lps_mm"], "lps_mm"), chain
    )
    z, y, x = (int(round(float(v))) for v in roi)
    hu = vol[z, y, x] * (window[1] - window[0]) + window[0]
    assert hu == pytest.approx(NODULE_HU, abs=150), (roi, vol.shape)


def test_montage_command_writes_a_png_from_the_training_config(export, tmp_path, capsys):
    root, rois = export
    rows = []
    for i, (fmt, image) in enumerate([("nifti", "ct.nii.gz"), ("dicom", "series")] * 2):
        roi = rois[fmt]["lps_mm"] if i < 3 else (np.nan,) * 3
        rows.append({"image": str(root / image), "roi_x": roi[0], "roi_y": roi[1], "roi_z": roi[2]})
    manifest = write_manifest(tmp_path, rows)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(manifest), "image_size": 24, "roi_space": "lps_mm",
        "preprocess": {"spacing": [1.0, 1.0, 1.0], "crop_size": [24, 24, 24]}}}}))  # fmt: skip
    out = tmp_path / "crops.png"
    assert montage(["--config", str(data), "--out", str(out), "--n", "4"]) == 0
    assert "wrote 4 preprocessed sample(s) of the train split" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as png:
        assert png.size[0] > 300 and png.size[1] > 4 * 150
