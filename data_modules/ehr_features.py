"""Which EHR features a data module uses, where each comes from, and their normalisation.

Features are the manifest's ``ehr_*`` columns and, with an ``ehr_table``, that table's
non-key columns (:mod:`data_modules.ehr_table` reads and joins it), narrowed by
``ehr_columns``. They are known from the files' headers alone, so the CLI can size a model
before any row is read. Normalisation statistics are fitted on the training split only
(no information from val/test leaks into the inputs) and travel in the checkpoint, so
finetuning and prediction scale a new archive exactly as pretraining did.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from data_modules.ehr_table import EHRJoin, ehr_table_features, join_ehr, read_ehr_table
from data_modules.manifest import ehr_columns, table_columns

log = logging.getLogger(__name__)


def feature_names(
    manifest: str, ehr_table: str | None, ehr_join: EHRJoin, selected: list[str] | None
) -> list[str]:
    """The feature columns in batch order: ``selected`` (each must exist in the manifest or
    the table), else every manifest ``ehr_*`` column followed by every table feature."""
    columns = table_columns(manifest)
    if ehr_table is None:
        return ehr_columns(columns, selected)
    from_table = ehr_table_features(ehr_table, ehr_join, None)
    if selected is None:
        return ehr_columns(columns) + from_table
    return ehr_columns(columns + from_table, selected)


def with_ehr_table(
    df: pd.DataFrame, manifest: str, ehr_table: str, ehr_join: EHRJoin, names: list[str]
) -> pd.DataFrame:
    """``df`` (the manifest's rows) with the chosen features of ``ehr_table`` joined on."""
    from_table = set(ehr_table_features(ehr_table, ehr_join, None))
    wanted = [c for c in names if c in from_table]
    table = read_ehr_table(ehr_table, ehr_join, wanted)
    df, match = join_ehr(df, table, ehr_join, wanted, str(ehr_table), str(manifest))
    log.info("EHR table %s: %d of %d scans have a record", ehr_table, match.matched, match.total)
    return df


def fit_categories(train: pd.DataFrame, names: list[str]) -> dict[str, list[str]]:
    """The categories of each text (categorical) feature, from the training rows only,
    sorted: a category's code is its index (see :mod:`data_modules.cell_values`)."""
    cats = {}
    for name in names:
        if not pd.api.types.is_numeric_dtype(train[name]):  # text: categorical
            values = train[name].dropna().map(lambda v: str(v).strip().lower())
            cats[name] = sorted(set(values.tolist()))
    return cats


def encode_ehr(rows: pd.DataFrame, stats: dict[str, Any], warn: bool = False) -> np.ndarray:
    """``rows``' features as float64 ``[N, F]``: numbers and days as they are, categories as
    their training code; a category unseen in training is missing (NaN), counted in a
    warning when ``warn``."""
    cats = stats.get("categories", {})
    out = np.empty((len(rows), len(stats["columns"])), dtype=np.float64)
    for j, name in enumerate(stats["columns"]):
        column = rows[name]
        if name not in cats:
            if not pd.api.types.is_numeric_dtype(column) and column.notna().any():
                raise ValueError(
                    f"EHR column {name!r} holds text ({column.dropna().iloc[0]!r}) but the "
                    "statistics it is normalised with have no categories for it (it was a "
                    "number in training): use the same EHR columns as training"
                )
            out[:, j] = pd.to_numeric(column, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
            continue
        text = column.map(lambda v: v if pd.isna(v) else str(v).strip().lower())
        codes = text.map({c: float(k) for k, c in enumerate(cats[name])})
        unseen = text.notna() & codes.isna()
        if warn and unseen.any():
            log.warning(
                "EHR column %r: %d value(s) not seen in training (e.g. %r; training had %s) "
                "are treated as missing",
                name, int(unseen.sum()), text[unseen].iloc[0], cats[name],
            )  # fmt: skip
        out[:, j] = codes.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def fit_ehr_stats(table: pd.DataFrame, names: list[str], manifest: str) -> dict[str, Any]:
    """Per-feature categories (text features), mean and standard deviation over the training
    rows (NaN ignored); all of it travels in the checkpoint.

    A feature missing in every training row keeps mean 0 / std 1 (it stays always-missing);
    a constant one gets std 1, so normalising never divides by zero.
    """
    rows = table.loc[table["split"] == "train", names]
    if len(rows) == 0:
        raise ValueError(f"manifest {manifest}: no training rows to fit EHR statistics on")
    cats = fit_categories(rows, names)
    train = encode_ehr(rows, {"columns": names, "categories": cats})
    with np.errstate(all="ignore"):
        mean = np.nanmean(train, axis=0)
        std = np.nanstd(train, axis=0)
    all_missing = [n for n, m in zip(names, mean, strict=True) if np.isnan(m)]
    if all_missing:
        log.warning(
            "EHR columns missing in every training row (kept as always-missing): %s", all_missing
        )
    if cats:
        log.info("EHR categorical columns (codes = index, fitted on train): %s", cats)
    mean = np.nan_to_num(mean, nan=0.0)
    std = np.where(np.isnan(std) | (std < 1e-8), 1.0, std)
    return {"columns": names, "mean": mean.tolist(), "std": std.tolist(), "categories": cats}


def normalise_ehr(rows: pd.DataFrame, stats: dict[str, Any]) -> np.ndarray:
    """``rows``' features encoded (:func:`encode_ehr`) and z-scored with ``stats`` (float32
    ``[N, F]``; NaN stays missing)."""
    values = encode_ehr(rows, stats, warn=True).astype(np.float32)
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    return ((values - mean) / std).astype(np.float32)
