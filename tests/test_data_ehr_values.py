"""Issue 24, item 2: dates, categories, units and missing tokens as hospital extracts hold them.

Before, every non-number was "not a number; leave it empty": the hint deleted dates and
categories, a unit suffix got the same advice, and validate needed a round per bad column
(with a knock-on "no EHR feature column" when the EHR table failed).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from data_modules.cell_values import DAY_ORIGIN, parse_column, time_values
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.manifest import ManifestError
from data_modules.validate import main as validate
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti
from tests.hospital_export import ehr_extract


def test_iso_dates_become_days_since_one_origin():
    col = pd.Series(["2021-03-04", "2021-03-04T12:00", "", "NA", "2021-03-05T00:00:00Z"])
    parsed = parse_column(col, "scan_time", categorical=False)
    assert parsed.kind == "date" and not parsed.column_faults and not parsed.row_faults
    expected = (pd.Timestamp("2021-03-04") - DAY_ORIGIN).days
    np.testing.assert_allclose(parsed.values, [expected, expected + 0.5, np.nan, np.nan,
                                               expected + 1], equal_nan=True)  # fmt: skip
    assert str(DAY_ORIGIN.date()) == "1970-01-01"
    np.testing.assert_allclose(time_values(pd.Series([3, "4.5", None])), [3.0, 4.5, np.nan])


def test_text_is_categorical_and_missing_tokens_are_missing():
    parsed = parse_column(pd.Series(["M", " f", "F", "unknown", "?", None]), "EHR column 'sex'")
    assert parsed.kind == "categorical" and not parsed.column_faults
    assert parsed.values.tolist()[:3] == ["m", "f", "f"] and parsed.values[3:].isna().all()


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (["72 kg", "80kg", "65"], r"EHR column 'ehr_weight' holds 2 number\(s\) with a unit "
         r"\(row\(s\) 0, 1: '72 kg'\); write the number alone \(72\) and put the unit in the "
         r"column's name \(e.g. ehr_weight_kg\)"),
        (["03/04/2021", "2021-05-06"], r"holds 1 date\(s\) not in ISO form \(row\(s\) 0: "
         r"'03/04/2021'\); day and month cannot be told apart: write dates as YYYY-MM-DD"),
        (["2021-03-04", "7"], r"mixes 1 ISO date\(s\) .* with other values \(row 1: '7'\)"),
    ],
)  # fmt: skip
def test_units_odd_dates_and_mixtures_are_column_faults_with_the_fix(cells, message):
    parsed = parse_column(pd.Series(cells), "EHR column 'ehr_weight'")
    assert any(__import__("re").search(message, f) for f in parsed.column_faults), parsed


def _archive(tmp_path, n=12, extra=None):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    rows = []
    ehr = ehr_extract([f"s{i}" for i in range(n)], [f"p{i}" for i in range(n)])
    for i in range(n):
        write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(shape=(8, 8, 8), centre_vox=(4, 4, 4)),
                    affine)  # fmt: skip
        row = {"image": f"{i}.nii.gz", "split": "val" if i >= n - 3 else "train"}
        row.update({k: v[i] for k, v in ehr.items()})
        rows.append(row)
    if extra:
        for key, values in extra.items():
            for i, r in enumerate(rows):
                r[key] = values[i]
    return write_manifest(tmp_path, rows, n_ehr=0)


def test_datamodule_reads_dates_and_fits_categories_on_train(tmp_path, caplog):
    # a category only the validation split has ('pipe') is unseen at training time
    smoking = ["current", "former", "never"] * 3 + ["pipe", "never", "current"]
    manifest = _archive(tmp_path, extra={"ehr_smoking": smoking})
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=2)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    stats = dm.ehr_stats
    assert stats["categories"] == {"ehr_sex": ["f", "m"],
                                   "ehr_smoking": ["current", "former", "never"]}  # fmt: skip
    assert "'ehr_smoking': 1 value(s) not seen in training (e.g. 'pipe'" in caplog.text
    table = dm._table
    start = (pd.Timestamp("2019-01-01") - DAY_ORIGIN).days
    assert table["scan_time"].between(start, start + 900).all()
    val = dm.dataset("val")
    pipe = list(val.table["scan_id"]).index("s9")
    j = stats["columns"].index("ehr_smoking")
    assert np.isnan(val.ehr[pipe, j]) and not np.isnan(val.ehr[pipe + 1, j])
    # the checkpoint carries the categories; a new archive is encoded the same way
    other = CTEHRDataModule(str(manifest), image_size=8, batch_size=2)
    other.setup("fit")
    other.load_state_dict(dm.state_dict())
    np.testing.assert_array_equal(other.dataset("val").ehr, val.ehr)


def test_sequence_mode_orders_scans_by_iso_dates(tmp_path):
    manifest = _archive(tmp_path, n=6, extra={
        "patient_id": ["a", "a", "a", "b", "b", "c"],
        "split": ["train"] * 5 + ["val"],
        "scan_time": ["2020-01-01", "2020-03-01T08:00", "2019-12-01", "2021-01-01",
                      "2021-01-11", "2022-01-01"],
        "label": [np.nan, 1.0, np.nan, np.nan, 0.0, 1.0],
    })  # fmt: skip
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=2, sequence=True, max_scans=3)
    dm.setup("fit")
    sample = dm.dataset("train")[0]
    times = sample["scan_times"].tolist()
    assert times[-1] == 0.0 and times[0] == pytest.approx(-(31 + 29 + 31 + 1 / 3), abs=1e-3)


def test_validate_reports_every_bad_column_once_without_knock_ons(tmp_path, capsys):
    manifest = _archive(tmp_path, extra={
        "ehr_weight": ["72 kg"] * 6 + ["80"] * 6,
        "ehr_dx_date": ["03/04/2021"] * 12,
    })  # fmt: skip
    pd.DataFrame({"scan_id": [f"s{i}" for i in range(12)],
                  "crp": ["5 mg/L"] * 12, "egfr": ["90"] * 11 + ["high"]}).to_csv(
        tmp_path / "labs.csv", index=False)  # fmt: skip
    code = validate([str(manifest), "--ehr", str(tmp_path / "labs.csv"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "EHR column 'ehr_weight' holds 6 number(s) with a unit" in out
    assert "EHR column 'ehr_dx_date' holds 12 date(s) not in ISO form" in out
    assert "column 'crp' holds 12 number(s) with a unit (row(s) 0, 1, 2 ...: '5 mg/L')" in out
    assert "row 11: column 'egfr' holds 'high', which is not a number" in out
    assert "no EHR feature column" not in out  # the knock-on of the failed table
    assert "leave it empty" not in out
    assert out.count("ehr_weight' holds") == 1  # once per column, not once per row


def test_validate_shows_how_columns_are_read(tmp_path, capsys):
    manifest = _archive(tmp_path)
    assert validate([str(manifest), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dates (days since 1970-01-01)': ['ehr_dx_date']" in out
    assert "'ehr_sex': ['f', 'm']" in out and "'ehr_smoking': ['current', 'former', 'never']" in out


def test_training_refuses_units_naming_the_column(tmp_path):
    manifest = _archive(tmp_path, extra={"ehr_weight": ["72 kg"] * 12})
    with pytest.raises(ManifestError, match=r"'ehr_weight' holds 12 number\(s\) with a unit"):
        CTEHRDataModule(str(manifest), image_size=8).setup("fit")


def test_nearest_before_refuses_dates_against_numbers(tmp_path):
    manifest = _archive(tmp_path)  # scan_time: ISO dates
    pd.DataFrame({"patient_id": ["p0"], "scan_time": [12.0], "crp": [1.0]}).to_csv(
        tmp_path / "labs.csv", index=False
    )
    dm = CTEHRDataModule(str(manifest), image_size=8, ehr_table=str(tmp_path / "labs.csv"),
                         ehr_join="nearest_before")  # fmt: skip
    with pytest.raises(ManifestError, match=r"the manifest's scan_time holds dates and .*labs\.csv"
                       r"'s holds numbers: .*write both as dates \(YYYY-MM-DD\) or both as days"):  # fmt: skip
        dm.setup("fit")
