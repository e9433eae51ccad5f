"""EHR features from a second table (Parquet or CSV), joined onto the manifest.

Two ways to join (``ehr_join``):

* ``scan_id`` — one EHR row per scan, matched exactly;
* ``nearest_before`` — a longitudinal record: one row per (``patient_id``, ``scan_time``)
  measurement; each scan takes the patient's latest row at or before its own ``scan_time``
  (``pandas.merge_asof``, backward). Records taken after the scan are never used (they
  would leak the future into the features).

A scan without a matching row, and an empty cell, stay NaN: the EHR tokenizer turns NaN into
its learned per-feature *missing* embedding (``ehr_missing`` in the batch), so nothing is
imputed with 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from data_modules.manifest import ManifestError, read_table, table_columns

EHRJoin = Literal["scan_id", "nearest_before"]
KEYS = {"scan_id": ("scan_id",), "nearest_before": ("patient_id", "scan_time")}


def ehr_table_features(path: str | Path, join: EHRJoin, columns: list[str] | None) -> list[str]:
    """The feature columns the table contributes (checked against its header only)."""
    if join not in KEYS:
        raise ManifestError(f"ehr_join must be one of {list(KEYS)}, got {join!r}")
    have = table_columns(path)
    absent = [k for k in KEYS[join] if k not in have]
    if absent:
        raise ManifestError(
            f"EHR table {path} lacks key column(s) {absent} needed for ehr_join={join!r}; "
            f"it has {have}"
        )
    keys = {"scan_id", "patient_id", "scan_time"}
    if columns is None:
        return [c for c in have if c not in keys]
    missing = [c for c in columns if c not in have]
    if missing:
        raise ManifestError(
            f"EHR columns {missing} are not in the EHR table {path} (it has {have})"
        )
    return list(columns)


def read_ehr_table(path: str | Path, join: EHRJoin, columns: list[str]) -> pd.DataFrame:
    """The table's key and feature columns, checked: numeric features, finite, unique keys."""
    df = read_table(path)
    keys = list(KEYS[join])
    for k in keys:
        if k not in df.columns:
            raise ManifestError(f"EHR table {path} lacks key column {k!r} (ehr_join={join!r})")
    df = df[keys + columns].reset_index(drop=True).copy()
    for k in ("scan_id", "patient_id"):
        if k in keys:
            blank = df[k].isna()
            if blank.any():
                raise ManifestError(
                    f"EHR table {path}: row {int(np.flatnonzero(blank)[0])} has an empty {k!r}"
                )
            df[k] = df[k].astype(str)
    if "scan_time" in keys:
        t = pd.to_numeric(df["scan_time"], errors="coerce")
        bad = t.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(
                f"EHR table {path}: row {i} has scan_time {df['scan_time'].iloc[i]!r}; "
                "nearest_before needs a number (days) in every row"
            )
        df["scan_time"] = t.astype("float64")
    for col in columns:
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        text = raw.astype(str).str.strip()
        bad = (values.isna() & raw.notna() & (text != "") & (text.str.lower() != "nan")).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(
                f"EHR table {path}: row {i} column {col!r} holds {raw.iloc[i]!r}, which is not a "
                f"number ({int(bad.sum())} such row(s)); leave a cell empty for a missing value"
            )
        if np.isinf(values.to_numpy(dtype="float64", na_value=np.nan)).any():
            i = int(np.flatnonzero(np.isinf(values.to_numpy(dtype="float64", na_value=np.nan)))[0])
            raise ManifestError(f"EHR table {path}: row {i} column {col!r} is infinite")
        df[col] = values.astype("float32")
    dup = df.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)[:10].tolist()
        raise ManifestError(
            f"EHR table {path}: key {tuple(df.loc[rows[0], keys])} appears more than once "
            f"(rows {rows}); each {' + '.join(keys)} must be unique"
        )
    return df


def join_ehr(
    manifest: pd.DataFrame, table: pd.DataFrame, join: EHRJoin, columns: list[str], source: str
) -> pd.DataFrame:
    """``manifest`` with the table's ``columns`` added (NaN where no row matches)."""
    clash = [c for c in columns if c in manifest.columns]
    if clash:
        raise ManifestError(
            f"EHR table {source} columns {clash} are also manifest columns; rename one of them "
            "or choose ehr_columns"
        )
    manifest = manifest.copy()
    for key in KEYS[join]:  # "007" in a CSV and 7 in a Parquet file must still match
        if key != "scan_time" and key in manifest.columns:
            col = manifest[key]
            manifest[key] = col.where(col.isna(), col.astype(str))
    if join == "scan_id":
        return manifest.merge(table, on="scan_id", how="left", validate="many_to_one")
    if "scan_time" not in manifest.columns:
        raise ManifestError(
            f"ehr_join='nearest_before' needs a scan_time column in the manifest (days) to match "
            f"{source}'s records against"
        )
    times = pd.to_numeric(manifest["scan_time"], errors="coerce")
    if times.isna().any():
        i = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise ManifestError(
            f"manifest row {i} (scan_id={manifest['scan_id'].iloc[i]!r}) has no numeric scan_time; "
            "ehr_join='nearest_before' needs one per scan"
        )
    left = manifest.assign(scan_time=times.astype("float64"), _order=np.arange(len(manifest)))
    right = table.rename(columns={"scan_time": "_ehr_time"}).sort_values("_ehr_time")
    out = pd.merge_asof(
        left.sort_values("scan_time"),
        right,
        left_on="scan_time",
        right_on="_ehr_time",
        by="patient_id",
        direction="backward",
    )
    return out.sort_values("_order").drop(columns=["_order", "_ehr_time"]).reset_index(drop=True)
