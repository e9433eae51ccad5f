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

**Join keys** (``scan_id``, ``patient_id``) are compared one way on both sides, whatever the
file format stored: as text with surrounding spaces removed, a whole-number float written
as an integer (a Parquet ``7.0`` is ``"7"``), nothing else changed — ``"0001"`` stays
``"0001"`` and does not match ``"1"`` (:func:`normalise_key`). A join that matches no scan
is an error naming both files with example keys from each side (and a hint when the keys
differ only by leading zeros or letter case); one that matches fewer than
``LOW_MATCH_WARNING`` of the scans is a warning with the same detail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from data_modules.cell_values import parse_column, time_values
from data_modules.manifest import ManifestError, normalise_key, read_table, table_columns

log = logging.getLogger(__name__)

EHRJoin = Literal["scan_id", "nearest_before"]
KEYS = {"scan_id": ("scan_id",), "nearest_before": ("patient_id", "scan_time")}
WORD = {"date": "dates", "numeric": "numbers", "categorical": "text"}
LOW_MATCH_WARNING = 0.5  # warn when fewer scans than this share find an EHR record


@dataclass
class JoinMatch:
    """How many manifest scans found an EHR record, with examples of unmatched keys."""

    matched: int
    total: int
    key: str
    manifest_examples: list[str]
    table_examples: list[str]
    hint: str = ""

    @property
    def fraction(self) -> float:
        return self.matched / self.total if self.total else 0.0

    def describe(self, manifest: str, table: str) -> str:
        return (
            f"EHR table {table} matched {self.matched} of the {self.total} scans of manifest "
            f"{manifest} ({self.fraction:.1%}) on {self.key!r}: manifest keys without a "
            f"record look like {self.manifest_examples}, the EHR table's keys like "
            f"{self.table_examples}. Keys are compared as text (spaces trimmed, 7.0 read as "
            f"'7'; '0001' is not '1'){self.hint}"
        )


def _key_hint(unmatched: set[str], table_keys: set[str], key: str) -> str:
    """Why keys that should match do not, when it is a common formatting slip: compares the
    manifest's unmatched keys with the table's keys no scan used."""
    lset, rset = unmatched, table_keys - unmatched

    def overlap(f) -> int:
        return len({f(v) for v in lset} & {f(v) for v in rset})

    if overlap(lambda v: v.lstrip("0") or "0") > 0:
        return (
            "; the keys differ by leading zeros: write both files with the same zero-padding "
            f"(e.g. df[{key!r}] = df[{key!r}].astype(str).str.zfill(4))"
        )
    if overlap(str.lower) > 0:
        return "; the keys differ by letter case: write both in the same case"
    return "; check that both files use the same identifier"


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
            df[k] = normalise_key(df[k])
            blank = df[k].isna() | (df[k] == "")
            if blank.any():
                raise ManifestError(
                    f"EHR table {path}: row {int(np.flatnonzero(blank)[0])} has an empty {k!r}"
                )
    faults: list[str] = []  # every bad column, each once, in one error
    if "scan_time" in keys:
        parsed = parse_column(df["scan_time"], "scan_time", categorical=False)
        faults += parsed.column_faults
        t = parsed.values.to_numpy(dtype="float64", na_value=np.nan)
        bad = ~np.isfinite(t)
        if bad.any() and not parsed.column_faults:
            i = int(np.flatnonzero(bad)[0])
            faults.append(
                f"row {i} has scan_time {df['scan_time'].iloc[i]!r} ({int(bad.sum())} such "
                "row(s)); nearest_before needs a number (days) or an ISO date in every row"
            )
        df["scan_time"] = t
        df.attrs["scan_time_kind"] = parsed.kind  # dates and numbers must not be joined
    for col in columns:
        parsed = parse_column(df[col], f"column {col!r}")
        faults += parsed.column_faults
        if parsed.row_faults:
            rows = sorted(parsed.row_faults)
            more = f" ({len(rows)} such row(s))" if len(rows) > 1 else ""
            faults.append(f"row {rows[0]}: {parsed.row_faults[rows[0]]}{more}")
        values = parsed.values
        df[col] = values.to_numpy() if parsed.kind == "categorical" else values.astype("float32")
    if faults:
        raise ManifestError(
            f"EHR table {path}: {len(faults)} problem(s):\n  - " + "\n  - ".join(faults)
        )
    dup = df.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)[:10].tolist()
        raise ManifestError(
            f"EHR table {path}: key {tuple(str(v) for v in df.loc[rows[0], keys])} appears more than once "
            f"(rows {rows}); each {' + '.join(keys)} must be unique"
        )
    return df


def join_ehr(
    manifest: pd.DataFrame,
    table: pd.DataFrame,
    join: EHRJoin,
    columns: list[str],
    source: str,
    manifest_source: str = "the manifest",
    on_no_match: Literal["raise", "report"] = "raise",
) -> tuple[pd.DataFrame, JoinMatch]:
    """``manifest`` with the table's ``columns`` added (NaN where no row matches), and how
    many scans matched.

    A join that matches no scan raises a :class:`ManifestError` naming both files and example
    keys (``on_no_match='report'`` returns instead, for ``validate`` to list it with the
    other problems); fewer than ``LOW_MATCH_WARNING`` matched scans log a warning."""
    clash = [c for c in columns if c in manifest.columns]
    if clash:
        raise ManifestError(
            f"EHR table {source} columns {clash} are also manifest columns; rename one of them "
            "or choose ehr_columns"
        )
    manifest = manifest.copy()
    key = "scan_id" if join == "scan_id" else "patient_id"
    if key not in manifest.columns:
        raise ManifestError(
            f"manifest {manifest_source} lacks the {key!r} column ehr_join={join!r} joins on"
        )
    manifest[key] = normalise_key(manifest[key])  # "007" in a CSV, 7 in a Parquet file
    right = table.assign(_ehr_row=True)
    if join == "scan_id":
        out = manifest.merge(right, on="scan_id", how="left", validate="many_to_one")
    else:
        out = _nearest_before(manifest, right, source, table.attrs.get("scan_time_kind"))
    found = out.pop("_ehr_row").notna().to_numpy()
    unmatched = manifest.loc[~found, key].dropna().unique().tolist()
    match = JoinMatch(
        matched=int(found.sum()),
        total=len(manifest),
        key=key if join == "scan_id" else "patient_id + scan_time (latest record at or before)",
        manifest_examples=[str(v) for v in unmatched[:3]],
        table_examples=[str(v) for v in table[key].drop_duplicates().head(3)],
    )
    if match.matched < match.total:
        used = set(manifest.loc[found, key])
        match.hint = _key_hint(set(unmatched), set(table[key].dropna()) - used, key)
        if join == "nearest_before":
            later_only = set(unmatched) & set(table[key])
            if later_only:
                match.hint += (
                    f"; {len(later_only)} patient(s) (e.g. {sorted(later_only)[:3]}) have only "
                    "records after their scan's scan_time, which are never used"
                )
    if match.total and match.matched == 0 and on_no_match == "raise":
        raise ManifestError(match.describe(manifest_source, source))
    if match.total and 0 < match.fraction < LOW_MATCH_WARNING:
        log.warning("%s", match.describe(manifest_source, source))
    return out, match


def _nearest_before(
    manifest: pd.DataFrame, right: pd.DataFrame, source: str, table_kind: str | None = None
) -> pd.DataFrame:
    """Each scan's patient's latest record at or before its ``scan_time`` (``table_kind``:
    whether the table's times were dates or numbers; the manifest's must be the same)."""
    if "scan_time" not in manifest.columns:
        raise ManifestError(
            f"ehr_join='nearest_before' needs a scan_time column in the manifest (days) to match "
            f"{source}'s records against"
        )
    kind = parse_column(manifest["scan_time"], "scan_time", categorical=False).kind
    if table_kind is not None and kind != table_kind:
        raise ManifestError(
            f"the manifest's scan_time holds {WORD[kind]} and {source}'s holds "
            f"{WORD[table_kind]}: ISO "
            "dates become days since 1970-01-01, numbers are days from your own origin, so "
            "they cannot be compared; write both as dates (YYYY-MM-DD) or both as days"
        )
    times = pd.Series(time_values(manifest["scan_time"]), index=manifest.index)
    if times.isna().any():
        i = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise ManifestError(
            f"manifest row {i} (scan_id={manifest['scan_id'].iloc[i]!r}) has no usable "
            f"scan_time ({manifest['scan_time'].iloc[i]!r}); ehr_join='nearest_before' needs "
            "one per scan (days or an ISO date)"
        )
    left = manifest.assign(scan_time=times.astype("float64"), _order=np.arange(len(manifest)))
    right = right.rename(columns={"scan_time": "_ehr_time"}).sort_values("_ehr_time")
    out = pd.merge_asof(
        left.sort_values("scan_time"),
        right,
        left_on="scan_time",
        right_on="_ehr_time",
        by="patient_id",
        direction="backward",
    )
    return out.sort_values("_order").drop(columns=["_order", "_ehr_time"]).reset_index(drop=True)
