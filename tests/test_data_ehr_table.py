"""EHR features from a second table: exact scan_id join, nearest earlier record per patient,
missing stays missing, bad tables named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.manifest import ManifestError
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti


@pytest.fixture
def archive(tmp_path):
    """Four scans of two patients (p0 at days 10 and 50, p1 at days 5 and 30), no EHR in the
    manifest except one ``ehr_f0`` column."""
    rows = []
    for i, (pid, t, split) in enumerate([("p0", 10, "train"), ("p0", 50, "train"),
                                         ("p1", 5, "val"), ("p1", 30, "val")]):  # fmt: skip
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(), np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "patient_id": pid, "scan_time": t, "split": split})
    return write_manifest(tmp_path, rows, n_ehr=1)


def _dm(manifest, table, join, **kw):
    return CTEHRDataModule(str(manifest), image_size=8, batch_size=4, ehr_table=str(table),
                           ehr_join=join, **kw)  # fmt: skip


def _raw_ehr(dm) -> pd.DataFrame:
    dm.setup("fit")
    return dm._table.set_index("scan_id")[dm.ehr_feature_names]


def test_join_on_scan_id_keeps_missing_missing(archive, tmp_path):
    table = pd.DataFrame({"scan_id": ["s0", "s1", "s2"], "crp": [1.0, np.nan, 3.0],
                          "smoker": [1, 0, 1]})  # fmt: skip
    table.to_parquet(tmp_path / "ehr.parquet")
    dm = _dm(archive, tmp_path / "ehr.parquet", "scan_id")
    assert dm.ehr_feature_names == ["ehr_f0", "crp", "smoker"] and dm.n_ehr_features == 3
    raw = _raw_ehr(dm)
    assert raw.loc["s0", "crp"] == 1.0 and np.isnan(raw.loc["s1", "crp"])
    assert raw.loc["s3"][["crp", "smoker"]].isna().all()  # no row for s3: missing, not 0
    batch = next(iter(dm.val_dataloader()))
    i = batch["scan_id"].index("s3")
    assert batch["ehr_missing"][i].tolist() == [False, True, True]
    assert torch.isnan(batch["ehr"][i, 1:]).all()


def test_nearest_earlier_record_per_patient(archive, tmp_path):
    table = pd.DataFrame({
        "patient_id": ["p0", "p0", "p0", "p1"],
        "scan_time": [0.0, 45.0, 60.0, 10.0],  # 60 is after every p0 scan; p1's is after day 5
        "hba1c": [5.0, 6.0, 9.9, 7.0],
    })  # fmt: skip
    table.to_csv(tmp_path / "ehr.csv", index=False)
    raw = _raw_ehr(_dm(archive, tmp_path / "ehr.csv", "nearest_before", ehr_columns=["hba1c"]))
    assert raw.loc["s0", "hba1c"] == 5.0  # day 10 <- day 0
    assert raw.loc["s1", "hba1c"] == 6.0  # day 50 <- day 45, never day 60 (the future)
    assert np.isnan(raw.loc["s2", "hba1c"])  # day 5: p1 has nothing earlier
    assert raw.loc["s3", "hba1c"] == 7.0


def test_bad_ehr_tables_are_named(archive, tmp_path):
    bad = pd.DataFrame({"scan_id": ["s0", "s1"], "crp": ["1.0", "high"]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(
        ManifestError, match=r"bad\.csv: 1 problem\(s\):\n  - row 1: column 'crp' holds 'high'"
    ):
        _dm(archive, tmp_path / "bad.csv", "scan_id").setup("fit")
    dup = pd.DataFrame({"scan_id": ["s0", "s0"], "crp": [1.0, 2.0]})
    dup.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(
        ManifestError, match=r"dup\.csv: key .*s0.* more than once \(rows \[0, 1\]\)"
    ):
        _dm(archive, tmp_path / "dup.csv", "scan_id").setup("fit")
    nokey = pd.DataFrame({"patient_id": ["p0"], "crp": [1.0]})
    nokey.to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(ManifestError, match=r"lacks key column\(s\) \['scan_time'\]"):
        _ = _dm(archive, tmp_path / "nokey.csv", "nearest_before").n_ehr_features
    with pytest.raises(ManifestError, match="does not exist"):
        _ = _dm(archive, tmp_path / "absent.csv", "scan_id").n_ehr_features
    with pytest.raises(ManifestError, match=r"\['nope'\] are not in"):
        _ = _dm(archive, tmp_path / "bad.csv", "scan_id", ehr_columns=["nope"]).n_ehr_features


def test_integer_ids_in_parquet_match_text_ids_in_csv(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", blob_volume(), np.eye(4))
    rows = [{"image": "a.nii.gz", "scan_id": 7, "patient_id": 1, "split": s} for s in ("train",)]
    rows.append({"image": "a.nii.gz", "scan_id": 8, "patient_id": 2, "split": "val"})
    manifest = write_manifest(tmp_path, rows, name="m.parquet", n_ehr=1)
    pd.DataFrame({"scan_id": ["7", "8"], "crp": [1.5, 2.5]}).to_csv(tmp_path / "e.csv", index=False)
    raw = _raw_ehr(_dm(manifest, tmp_path / "e.csv", "scan_id"))
    assert raw["crp"].to_dict() == {"7": 1.5, "8": 2.5}


# --- join keys as users bring them (issue 14, case 2) ----------------------------------------


def _two_patient_archive(tmp_path, ids=("0001", "0002"), name="m.csv"):
    rows = []
    for i, pid in enumerate(ids):
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(), np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "patient_id": pid, "scan_time": 10 * (i + 1),
                     "split": "train" if i == 0 else "val"})  # fmt: skip
    return write_manifest(tmp_path, rows, name=name, n_ehr=1)


def test_no_matching_key_is_an_error_naming_both_files_and_example_keys(tmp_path, capsys):
    from data_modules.validate import main as validate

    manifest = _two_patient_archive(tmp_path)  # patient_id 0001, 0002 (text in the CSV)
    ehr = tmp_path / "labs.csv"
    pd.DataFrame({"patient_id": [1, 2], "scan_time": [0, 0], "crp": [1.0, 2.0]}).to_csv(
        ehr, index=False
    )
    with pytest.raises(ManifestError) as err:
        _dm(manifest, ehr, "nearest_before").setup("fit")
    message = str(err.value)
    for expected in (str(ehr), str(manifest), "matched 0 of the 2 scans", "['0001', '0002']",
                     "['1', '2']", "leading zeros"):  # fmt: skip
        assert expected in message, (expected, message)
    # validate reports the same and exits 1 (it said OK with 0.0 % matched before)
    assert validate([str(manifest), "--ehr", str(ehr), "--ehr-join", "nearest_before",
                     "--no-progress"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "matched 0 of the 2 scans" in out and "0.0% of scans have an EHR record" in out


def test_integer_ids_in_parquet_on_both_sides_join_without_merge_error(tmp_path):
    manifest = _two_patient_archive(tmp_path, ids=(1, 2), name="m.parquet")
    ehr = tmp_path / "labs.parquet"
    pd.DataFrame({"patient_id": [1, 2, 2], "scan_time": [0, 0, 15], "crp": [1.0, 2.0, 3.0]}
                 ).to_parquet(ehr)  # fmt: skip
    raw = _raw_ehr(_dm(manifest, ehr, "nearest_before"))
    assert raw["crp"].tolist() == [1.0, 3.0]  # p2's scan at day 20 takes the day-15 record


def test_whole_number_float_ids_match_text_ids(tmp_path):
    manifest = _two_patient_archive(tmp_path, ids=("7", "8"))
    ehr = tmp_path / "labs.parquet"
    pd.DataFrame({"patient_id": [7.0, 8.0], "scan_time": [0, 0], "crp": [1.0, 2.0]}).to_parquet(ehr)
    assert _raw_ehr(_dm(manifest, ehr, "nearest_before"))["crp"].tolist() == [1.0, 2.0]


def test_low_match_is_a_loud_warning(tmp_path, caplog, capsys):
    from data_modules.validate import main as validate

    rows = []
    for i in range(4):
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(), np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "split": "train" if i < 3 else "val"})
    manifest = write_manifest(tmp_path, rows, n_ehr=1)  # scan ids s0..s3
    ehr = tmp_path / "labs.csv"
    pd.DataFrame({"scan_id": ["s0", "S1 "], "crp": [1.0, 2.0]}).to_csv(ehr, index=False)
    with caplog.at_level("WARNING"):
        _raw_ehr(_dm(manifest, ehr, "scan_id"))
    assert "matched 1 of the 4 scans" in caplog.text and "letter case" in caplog.text
    assert validate([str(manifest), "--ehr", str(ehr), "--no-progress"]) == 0  # a warning only
    out = capsys.readouterr().out  # (the split preview adds its own warnings: 1 val scan)
    assert "warning(s)" in out and "\n- EHR table" in out and "matched 1 of the 4 scans" in out
