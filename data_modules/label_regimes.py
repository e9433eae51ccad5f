"""Label regimes: train on the labels of a random share of the labelled *patients*.

Few-label studies (1/5/10/100 % of labelled patients, several random subsets each) draw the
subset per patient, never per scan, so one patient's scans are all in or all out. With a
given seed the subsets are nested (the 1 % patients are among the 5 % ones), so a
regime curve compares like with like.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def labelled_patient_subset(patients: list[str], fraction: float, seed: int) -> set[str]:
    """``max(1, round(fraction * n))`` of the (labelled) ``patients``, chosen by a seeded
    permutation of their sorted ids: the same seed gives nested subsets across fractions."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    ids = sorted(set(patients))
    if not ids:
        return set()
    n = max(1, round(fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in order[:n]}


def hide_labels_outside_subset(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """``rows`` with the labels of every labelled patient outside the subset set to missing
    (they stay in the table as unlabelled scans; ``require_labels`` then drops them)."""
    if fraction >= 1.0:
        return rows
    labelled = rows.loc[rows["label"].notna(), "patient_id"].astype(str)
    keep = labelled_patient_subset(labelled.tolist(), fraction, seed)
    rows = rows.copy()
    hidden = rows["label"].notna() & ~rows["patient_id"].astype(str).isin(keep)
    rows.loc[hidden, "label"] = np.nan
    log.info(
        "label regime %.3g (seed %d): labels of %d of %d labelled training patients kept",
        fraction, seed, len(keep), labelled.nunique(),
    )  # fmt: skip
    return rows
