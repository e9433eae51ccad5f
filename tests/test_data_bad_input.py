"""Bad input on the real-archive path: skip mode reports at the end of each epoch whichever
worker met the problem; ROI / scan_time columns are checked and named."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.manifest import ManifestError
from data_modules.transforms import BadSampleError
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti


def _archive(tmp_path, n=6):
    rows = []
    for i in range(n):
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(), np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "split": "val" if i == n - 1 else "train"})
    return rows


@pytest.mark.parametrize("streaming", [False, True])
def test_skip_reports_at_epoch_end_across_workers(tmp_path, caplog, streaming):
    rows = _archive(tmp_path)
    data = (tmp_path / "2.nii.gz").read_bytes()
    (tmp_path / "2.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    rows[3]["image"] = "gone.nii.gz"
    manifest = write_manifest(tmp_path, rows)
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=2, num_workers=2,
                         on_bad_sample="skip", cache_volumes=False, streaming=streaming,
                         drop_last=False)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in range(2):  # two epochs: reported each time, training goes on
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data_modules.ct_ehr"):
            ids = sorted(s for b in loader if b for s in b["scan_id"])
        assert ids == ["s0", "s1", "s4"]
        assert all("skipped" not in b for b in loader)
        assert "train split: 2 bad sample(s) skipped this epoch" in caplog.text
        assert (
            "2.nii.gz could not be read" in caplog.text
            and "gone.nii.gz does not exist" in caplog.text
        )
    assert len(loader.report.last_epoch) == 2


def test_raise_names_file_and_row_from_a_worker(tmp_path):
    rows = _archive(tmp_path)
    data = (tmp_path / "1.nii.gz").read_bytes()
    (tmp_path / "1.nii.gz").write_bytes(data[: len(data) // 2])
    dm = CTEHRDataModule(str(write_manifest(tmp_path, rows)), image_size=8, batch_size=2,
                         num_workers=2, cache_volumes=False, drop_last=False)  # fmt: skip
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"1\.nii\.gz could not be read.*scan_id='s1'.*skip"):
        list(dm.train_dataloader())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"roi_x": 1.0, "roi_y": 2.0}, r"has \['roi_x', 'roi_y'\] but not all"),
        (
            {"roi_x": [1.0] * 5 + ["left"], "roi_y": 0.0, "roi_z": 0.0},
            r"row 5 .*roi_x 'left' is not a finite",
        ),
        (
            {"roi_x": [1.0] * 5 + [np.nan], "roi_y": 0.0, "roi_z": 0.0},
            r"row 5 .*only some of roi_x",
        ),
        (
            {"scan_time": [0] * 5 + ["yesterday"]},
            r"row 5 .*scan_time holds 'yesterday', which is not a number .* or an ISO date",
        ),
    ],
)
def test_roi_and_scan_time_columns_are_checked(tmp_path, change, message):
    rows = _archive(tmp_path)
    for key, value in change.items():
        for i, r in enumerate(rows):
            r[key] = value[i] if isinstance(value, list) else value
    manifest = write_manifest(tmp_path, rows)
    with pytest.raises(ManifestError, match=message):
        CTEHRDataModule(str(manifest), image_size=8).setup("fit")
