"""``python -m data_modules.validate``: a clean archive passes with a report; every problem of
a broken one is listed with its row, and the exit code is non-zero."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.validate import main
from tests.ct_fixtures import blob_volume, write_dicom_series, write_manifest, write_nifti


def _archive(root, n=4):
    rows = []
    for i in range(n):
        write_nifti(root / f"{i}.nii.gz", blob_volume(), np.diag([0.8, 0.8, 2.0, 1.0]))
        rows.append({"image": f"{i}.nii.gz", "split": "val" if i == 0 else "train"})
    return rows


def test_clean_archive_passes_with_a_report(tmp_path, capsys):
    rows = _archive(tmp_path)
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "dcm", blob_volume(shape=(12, 10, 6)).astype(np.int16))
    rows.append({"image": "dcm", "split": "train"})
    manifest = write_manifest(tmp_path, rows, name="m.parquet")
    code = main([str(manifest), "--no-progress", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "**OK**" in out and "| z | 2 | 2 | 2.5 |" in out and "'RAS': 4" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images_checked"] == 5 and report["splits"] == {"train": 4, "val": 1}
    assert report["size_voxels"]["x"]["max"] == 20


def test_every_problem_is_listed_with_its_row(tmp_path, capsys):
    rows = _archive(tmp_path, n=8)
    data = (tmp_path / "1.nii.gz").read_bytes()
    (tmp_path / "1.nii.gz").write_bytes(data[: len(data) // 2])  # truncated .nii.gz
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "2.nii.gz")
    (tmp_path / "3.nii.gz").write_bytes(gzip.compress(b"not an image"))
    (tmp_path / "empty_dicom").mkdir()
    rows[4]["image"] = "empty_dicom"
    rows[5]["image"] = "absent.nii.gz"
    rows[6]["label"] = 3
    rows[7]["ehr_f1"] = "lots"
    rows.append({"image": "0.nii.gz", "patient_id": "p0", "scan_id": "s8", "split": "test"})
    manifest = write_manifest(tmp_path, rows)
    assert main([str(manifest), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out
    # One pass finds everything: the table-level patient leak does not stop the row and
    # image checks (issue 14, case 7), and rows keep the user's numbering.
    for expected in [
        "patient 'p0' is in splits",
        "row 1 (scan_id='s1'): image", "1.nii.gz is truncated or corrupt",
        "row 2 (scan_id='s2'): image", "has shape (4, 4, 4, 2); a 3-D CT volume is required",
        "3.nii.gz could not be read as NIfTI",
        "empty_dicom is a folder without DICOM image files",
        "absent.nii.gz does not exist",
        "row 6 (scan_id='s6'): label 3", "row 7 (scan_id='s7'): EHR column 'ehr_f1' holds 'lots'",
    ]:  # fmt: skip
        assert expected in out, (expected, out)
    assert "## 8 problem(s)" in out


def test_decode_finds_nan_voxels(tmp_path, capsys):
    rows = _archive(tmp_path, n=2)
    vol = blob_volume().astype(np.float32)
    vol[1, 1, 1] = np.nan
    write_nifti(tmp_path / "1.nii.gz", vol, np.eye(4))
    manifest = write_manifest(tmp_path, rows)
    assert main([str(manifest), "--no-progress"]) == 0  # headers alone cannot see NaNs
    assert main([str(manifest), "--no-progress", "--decode"]) == 1
    assert "1 NaN/inf voxels" in capsys.readouterr().out


def test_missing_manifest_and_ehr_table(tmp_path, capsys):
    assert main([str(tmp_path / "nope.csv"), "--no-progress"]) == 1
    assert "nope.csv does not exist" in capsys.readouterr().out
    manifest = write_manifest(tmp_path, _archive(tmp_path, n=2))
    # (text alone is a categorical column since issue 24; a unit suffix is refused)
    pd.DataFrame({"scan_id": ["s0"], "crp": ["3 mg/L"]}).to_csv(tmp_path / "e.csv", index=False)
    assert main([str(manifest), "--ehr", str(tmp_path / "e.csv"), "--no-progress"]) == 1
    assert (
        "column 'crp' holds 1 number(s) with a unit (row(s) 0: '3 mg/L')" in capsys.readouterr().out
    )
    pd.DataFrame({"scan_id": ["s0"], "crp": [2.0]}).to_csv(tmp_path / "e.csv", index=False)
    assert main([str(manifest), "--ehr", str(tmp_path / "e.csv"), "--no-progress"]) == 0
    assert "50.0% of scans have an EHR record" in capsys.readouterr().out
