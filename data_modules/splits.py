"""Which rows of the manifest each loader sees: the split, the label subset, labelled-only.

Splits are by patient, so no patient's scans are on both sides of an evaluation; when the
manifest has no ``split`` column they are drawn here with a seed. The label fraction hides
labels of training patients only (:mod:`data_modules.label_subsets`), so val/test are the
same for every fraction and results across fractions compare.
"""

from __future__ import annotations

import logging

import pandas as pd

from data_modules.label_subsets import apply_label_fraction
from data_modules.manifest import assign_patient_splits

log = logging.getLogger(__name__)


def with_splits(
    df: pd.DataFrame, manifest: str, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """``df`` with a ``split`` column: its own when it has one, else drawn per patient."""
    if "split" in df.columns:
        return df
    df["split"] = assign_patient_splits(df, val_fraction, test_fraction, seed)
    if df["cohort"].nunique() > 1:
        log.warning(
            "manifest %s has no split column: patients of every cohort (%s) were split "
            "at random, so 'external' scans are also trained on; add a split column "
            "(e.g. external -> test) for a true external test",
            manifest,
            sorted(df["cohort"].unique()),
        )
    return df


def split_rows(
    table: pd.DataFrame,
    name: str,
    manifest: str,
    predict_split: str = "test",
    label_fraction: float = 1.0,
    label_subset_seed: int = 0,
    require_labels: bool = False,
    by_patient: bool = False,
) -> pd.DataFrame:
    """The rows of split ``name`` (``predict``: those of ``predict_split``, or every row for
    ``all``); for ``train``, labels outside the ``label_fraction`` subset hidden and, under
    ``require_labels``, only the labelled scans kept (``by_patient``, sequence mode: every
    scan of a patient with a labelled scan, so the sequences stay whole). An empty result is
    an error naming the splits present."""
    if name == "predict":
        rows = table if predict_split == "all" else table[table["split"] == predict_split]
    else:
        rows = table[table["split"] == name]
    if name == "train" and label_fraction < 1.0:
        rows = apply_label_fraction(rows, label_fraction, label_subset_seed, str(manifest))
        log.info(
            "label_fraction=%s (subset %d): labels of %d training patients kept",
            label_fraction,
            label_subset_seed,
            rows.loc[rows["label"].notna(), "patient_id"].nunique(),
        )
    if name == "train" and require_labels and by_patient:
        labelled = rows["patient_id"].isin(rows.loc[rows["label"].notna(), "patient_id"])
        log.info(
            "training on the %d labelled of %d training patients (%d scans)",
            rows.loc[labelled, "patient_id"].nunique(), rows["patient_id"].nunique(),
            int(labelled.sum()),
        )  # fmt: skip
        rows = rows[labelled]
    elif name == "train" and require_labels:
        labelled = rows["label"].notna()
        log.info("training on %d labelled of %d training scans", int(labelled.sum()), len(rows))
        rows = rows[labelled]
    if rows.empty:
        raise ValueError(
            f"manifest {manifest}: the {name!r} split has no usable scan "
            f"(splits present: {table['split'].value_counts().to_dict()})"
        )
    return rows.reset_index(drop=True)
