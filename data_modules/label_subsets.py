"""Label regimes (1 / 5 / 10 / 100 % of labelled patients) as seeded, patient-level subsets.

The few-label literature subsamples *patients*, not scans, so a patient's scans are either
all labelled or all unlabelled (no leakage of one patient's label through another scan).
Subsets are stratified by the patient's label (a patient is positive when any of their
labelled scans is) so that even 1 % keeps at least one positive and one negative patient,
and they are **nested**: for one ``seed``, the 5 % subset contains the 1 % subset, the 10 %
subset the 5 % one, and so on (each class is drawn in one seeded order and the first
``max(1, round(fraction * n_class))`` patients kept). Different seeds give different subsets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class LabelFractionError(ValueError):
    """A label fraction cannot be applied to these training rows."""


def label_subset_patients(
    rows: pd.DataFrame, fraction: float, seed: int, source: str = "manifest"
) -> set[str]:
    """The patients of ``rows`` (columns ``patient_id``, ``label``; NaN = unlabelled) whose
    labels are kept at ``fraction`` of the labelled patients, for subset ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise LabelFractionError(f"label_fraction must be in (0, 1], got {fraction}")
    labelled = rows.loc[rows["label"].notna(), ["patient_id", "label"]]
    per_patient = labelled.groupby("patient_id", sort=True)["label"].max()
    chosen: set[str] = set()
    for cls in (0.0, 1.0):
        patients = per_patient.index[per_patient == cls].to_numpy()
        if len(patients) == 0:
            name = "positive" if cls else "negative"
            raise LabelFractionError(
                f"{source}: label_fraction={fraction} needs labelled training patients of both "
                f"classes, but the training split has no {name} one "
                f"({int((per_patient == 1).sum())} positive, {int((per_patient == 0).sum())} "
                "negative patients); label more training patients or use label_fraction: 1.0"
            )
        order = np.random.default_rng([seed, int(cls)]).permutation(len(patients))
        n = max(1, round(fraction * len(patients)))
        chosen.update(str(p) for p in patients[order[:n]])
    return chosen


def apply_label_fraction(
    rows: pd.DataFrame, fraction: float, seed: int, source: str = "manifest"
) -> pd.DataFrame:
    """``rows`` with the labels of the patients outside the subset set to NaN (unlabelled),
    so a finetuning run (``require_labels``) leaves them out and a pretraining run keeps
    their scans as unlabelled data. ``fraction == 1`` returns ``rows`` unchanged."""
    if fraction == 1.0:
        return rows
    keep = label_subset_patients(rows, fraction, seed, source)
    rows = rows.copy()
    rows.loc[~rows["patient_id"].astype(str).isin(keep), "label"] = np.nan
    return rows
