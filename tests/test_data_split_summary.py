"""Issue 24, item 5: what will be trained on is printed at setup, previewed by validate, and
an evaluation split too small or one-class for AUROC is a warning (before, checkpoint
selection ran silently on 2 labelled validation scans)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.split_summary import MIN_EVAL_LABELLED, split_summary, summary_warnings
from data_modules.validate import main as validate
from tests.ct_fixtures import nifti_archive


def test_summary_counts_patients_scans_labels_per_split_and_cohort():
    table = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c", "d"], "scan_id": ["1", "2", "3", "4", "5"],
        "split": ["train", "train", "train", "val", "test"],
        "cohort": ["int", "int", "int", "int", "ext"], "label": [1.0, np.nan, 0.0, 1.0, 0.0],
    })  # fmt: skip
    s = split_summary(table)
    assert s.to_dict("records") == [
        {"split": "train", "cohort": "int", "patients": 2, "scans": 3, "labelled": 2, "positives": 1},
        {"split": "val", "cohort": "int", "patients": 1, "scans": 1, "labelled": 1, "positives": 1},
        {"split": "test", "cohort": "ext", "patients": 1, "scans": 1, "labelled": 1, "positives": 0},
    ]  # fmt: skip
    warnings = summary_warnings(s)
    assert len(warnings) == 4  # val and test: too few labels, one class each
    assert warnings[0].startswith(
        f"the val split (cohort 'int') has 1 labelled scan(s), fewer than {MIN_EVAL_LABELLED}"
    )
    assert (
        "the test split (cohort 'ext') has only negative labels (1): AUROC is undefined"
        in warnings[3]
    )


def test_setup_prints_the_summary_and_warns(tmp_path, caplog):
    manifest = nifti_archive(tmp_path, n_train=6, n_val=2, n_test=2)
    dm = CTEHRDataModule(str(manifest), image_size=8, batch_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "| split | cohort | patients | scans | labelled | positives |" in caplog.text
    assert "| val | internal | 2 | 2 | 2 | 1 |" in caplog.text
    assert "the val split (cohort 'internal') has 2 labelled scan(s), fewer than 20" in caplog.text


def test_validate_previews_the_splits(tmp_path, capsys):
    manifest = nifti_archive(tmp_path, n_train=6, n_val=2, n_test=2, name="m.csv")
    assert validate([str(manifest), "--no-progress"]) == 0  # warnings do not fail the check
    out = capsys.readouterr().out
    assert (
        "## Splits (what training will print)" in out
        and "| train | internal | 6 | 6 | 6 | 3 |" in out
    )
    assert "has 2 labelled scan(s), fewer than 20" in out
    pd.read_csv(manifest).drop(columns="split").to_csv(tmp_path / "nosplit.csv", index=False)
    assert validate([str(tmp_path / "nosplit.csv"), "--no-progress"]) == 0
    assert (
        "no split column: the preview shows the splits CTEHRDataModule draws"
        in capsys.readouterr().out
    )
