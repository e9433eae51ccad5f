"""The manifest: one row per scan. Reading, validation and patient-level splitting.

Columns (see README "Bring your own archive"):
``patient_id``, ``scan_id`` (unique), ``image`` (a NIfTI file, a folder holding one DICOM
series, or an Enhanced CT multi-frame file; relative to the manifest's folder or absolute;
DICOM is checked by :mod:`data_modules.dicom`), optional ``label`` (0/1, empty = unlabelled;
the column may be absent: an unlabelled archive), ``cohort``, ``split``
(train/val/test; assigned per patient when absent), ``scan_time``, ``roi_x/roi_y/roi_z``
(mm) and EHR features as ``ehr_*`` columns. Identifiers are join keys, normalised by
:func:`normalise_key` (text, spaces trimmed, ``7.0`` read as ``"7"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.cell_values import parse_column
from data_modules.roi import ROI_SPACE_COLUMN, row_spaces, undeclared_message

REQUIRED_COLUMNS = ("patient_id", "scan_id", "image")
SPLITS = ("train", "val", "test")
EHR_PREFIX = "ehr_"
ROI_COLUMNS = ("roi_x", "roi_y", "roi_z")
SERIES_COLUMN = "series_uid"  # optional: which DICOM series of a folder (data_modules.dicom_series)


class ManifestError(ValueError):
    """The manifest (or a row of it) breaks the data contract; the message says how to fix it."""


@dataclass
class RowProblems:
    """Rows dropped under ``on_bad_sample='skip'``, with the reason for each."""

    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.reasons.append(reason)

    def summary(self, limit: int = 5) -> str:
        head = "; ".join(self.reasons[:limit])
        more = f" (+{len(self.reasons) - limit} more)" if len(self.reasons) > limit else ""
        return f"{len(self.reasons)} skipped: {head}{more}"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a Parquet or CSV table; identifiers stay strings (``007`` is not ``7``)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(
            f"manifest {path} does not exist: check the path (relative to {Path.cwd()})"
        )
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            df = pd.read_parquet(path)
        elif suffix.endswith(".csv") or suffix.endswith(".csv.gz"):
            df = pd.read_csv(
                path, dtype={"patient_id": str, "scan_id": str, "image": str, "series_uid": str}
            )
        else:
            raise ManifestError(f"manifest {path}: unknown format {suffix!r}; use .parquet or .csv")
    except ManifestError:
        raise
    except Exception as err:  # pyarrow / parser errors: say which file
        raise ManifestError(f"manifest {path} could not be read: {err}") from err
    return df


def table_columns(path: str | Path) -> list[str]:
    """Column names without reading the rows (cheap, for sizing a model before setup)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(
            f"manifest {path} does not exist: check the path (relative to {Path.cwd()})"
        )
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0).columns)


def ehr_columns(columns: list[str], selected: list[str] | None = None) -> list[str]:
    """The EHR feature columns: ``selected`` if given (each must exist), else every ``ehr_*``."""
    if selected is None:
        return [c for c in columns if c.startswith(EHR_PREFIX)]
    missing = [c for c in selected if c not in columns]
    if missing:
        raise ManifestError(f"EHR columns {missing} are not in the manifest (it has {columns})")
    return list(selected)


def _key_text(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        value = value.decode()
    return str(value).strip()


def normalise_key(column: pd.Series) -> pd.Series:
    """A join key as text, the one way both sides of every join are compared: surrounding
    spaces removed, whole-number floats as integers (``7.0`` -> ``"7"``), missing stays
    NaN; plain Python strings (object dtype) so pandas never sees two string dtypes."""
    return pd.Series([_key_text(v) for v in column.tolist()], index=column.index, dtype=object)


def _row_name(df: pd.DataFrame, i: int) -> str:
    return f"row {i} (scan_id={df['scan_id'].iloc[i]!r})"


def validate_manifest(
    df: pd.DataFrame,
    source: str,
    ehr_cols: list[str],
    on_bad_sample: str = "raise",
    problems: RowProblems | None = None,
    table_problems: list[str] | None = None,
    roi_space: str | None = None,
) -> pd.DataFrame:
    """Check the table against the data contract and return a clean copy.

    ``roi_space`` declares the coordinate space of ``roi_x/y/z`` for every row (see
    :mod:`data_modules.roi`); a ``roi_space`` column does it per row. An ROI with neither
    is a table-level fault: there is no default guess.

    Table-level faults (missing columns, empty ids, duplicate ``scan_id``, a patient in two
    splits) raise: no row can be trusted until they are fixed. Row-level faults (a label
    outside {0, 1}, a non-numeric EHR value, an unknown split name) raise under
    ``on_bad_sample='raise'``, or drop the row and record why under ``'skip'``.

    ``table_problems`` (a list; ``validate`` passes one) collects the table-level faults
    instead of raising, and the check goes on with what it can trust (rows with an empty id
    are dropped, duplicates kept), so one run of ``validate`` reports every problem of an
    archive, its images included. Only a missing ``image`` column still stops it.
    """
    if on_bad_sample not in ("raise", "skip"):
        raise ManifestError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
    problems = problems if problems is not None else RowProblems()

    def table_fault(message: str) -> None:
        if table_problems is None:
            raise ManifestError(message)
        table_problems.append(message)

    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        message = f"manifest {source} lacks required column(s) {absent}; it has {list(df.columns)}"
        if "image" in absent:
            raise ManifestError(message)
        table_fault(message)
    df = df.reset_index(drop=True).copy()
    for col in absent:  # only reached when collecting: stand-ins keep the other checks going
        df[col] = [f"<row {i}>" for i in range(len(df))]
    blank_rows = np.zeros(len(df), dtype=bool)
    for col in ("patient_id", "scan_id", "image"):
        # ids as join keys are compared (normalise_key); paths only lose no characters
        text = normalise_key(df[col]) if col != "image" else df[col].map(_key_text)
        blank = (text.isna() | (text == "")).to_numpy()
        if blank.any():
            rows = np.flatnonzero(blank)
            table_fault(
                f"manifest {source}: row {int(rows[0])} has an empty {col!r} "
                f"({len(rows)} such row(s)); every row needs one"
            )
            blank_rows |= blank
        df[col] = text if col != "image" else df[col].astype(str).astype(object)
    if blank_rows.any():
        df = df[~blank_rows].reset_index(drop=True)
    dup = df["scan_id"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:10].tolist()
        table_fault(
            f"manifest {source}: scan_id {df['scan_id'][rows[0]]!r} appears more than once "
            f"(rows {rows}); scan_id must be unique per scan"
        )

    bad = np.zeros(len(df), dtype=bool)

    def flag(mask: np.ndarray, describe) -> None:
        for i in np.flatnonzero(mask & ~bad):
            reason = f"manifest {source}: {_row_name(df, i)}: {describe(i)}"
            if on_bad_sample == "raise":
                raise ManifestError(reason + " (or set on_bad_sample: skip to drop such rows)")
            problems.add(reason)
            bad[i] = True

    if "label" in df.columns:
        raw = df["label"]
        label = pd.to_numeric(raw, errors="coerce")
        not_numeric = (label.isna() & raw.notna() & (raw.astype(str).str.strip() != "")).to_numpy()
        flag(not_numeric, lambda i: f"label {raw.iloc[i]!r} is not a number; use 0, 1 or empty")
        outside = (label.notna() & ~label.isin([0, 1])).to_numpy()
        flag(outside, lambda i: f"label {label.iloc[i]:g} is outside {{0, 1}}; use 0, 1 or empty")
        df["label"] = label.where(label.isin([0, 1])).astype("float32")
    else:
        df["label"] = np.float32("nan")

    for col in [*ehr_cols, *(["scan_time"] if "scan_time" in df.columns else [])]:
        # numbers, ISO dates (-> days), categories (text), missing tokens: cell_values
        is_time = col == "scan_time"
        parsed = parse_column(df[col], "scan_time" if is_time else f"EHR column {col!r}",
                              categorical=not is_time)  # fmt: skip
        for message in parsed.column_faults:  # every bad column, each once
            table_fault(f"manifest {source}: {message}")
        if parsed.row_faults:
            faults = parsed.row_faults
            flag(np.isin(np.arange(len(df)), list(faults)), lambda i, f=faults: f[i])
        if parsed.kind == "categorical":
            df[col] = parsed.values.to_numpy()
        else:
            df[col] = parsed.values.to_numpy().astype("float64" if is_time else "float32")

    roi_present = [c for c in ROI_COLUMNS if c in df.columns]
    if roi_present and len(roi_present) < 3:
        table_fault(
            f"manifest {source} has {roi_present} but not all of {list(ROI_COLUMNS)}; "
            "give the ROI centre as three columns (and its roi_space) or none"
        )
        df = df.drop(columns=roi_present)
        roi_present = []
    for col in roi_present:
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        text = raw.astype(str).str.strip()
        not_numeric = (
            values.isna() & raw.notna() & (text != "") & (text.str.lower() != "nan")
        ).to_numpy() | np.isinf(values.to_numpy(dtype="float64", na_value=np.nan))
        flag(not_numeric, lambda i, col=col, raw=raw: f"{col} {raw.iloc[i]!r} is not a finite "
             "number; leave it empty when unknown")  # fmt: skip
        df[col] = values.astype("float64")
    if roi_present:
        roi = df[list(ROI_COLUMNS)].to_numpy(dtype="float64", na_value=np.nan)
        partial = np.isnan(roi).any(1) & ~np.isnan(roi).all(1)
        flag(partial, lambda i: "has only some of roi_x/roi_y/roi_z; give all three or none")
        has_roi = np.isfinite(roi).all(1) & ~bad
        spaces, faults = row_spaces(df, has_roi, roi_space, source)
        undeclared = [i for i, msg in faults if msg.endswith("but no roi_space")]
        if undeclared:  # one message for the table: the declaration is missing, not a row
            table_fault(undeclared_message(source, len(undeclared), undeclared[0]))
        others = dict(f for f in faults if not f[1].endswith("but no roi_space"))
        flag(np.isin(np.arange(len(df)), list(others)), lambda i: others[i])
        df[ROI_SPACE_COLUMN] = spaces

    if "split" in df.columns:
        split = df["split"].astype(str).str.strip().str.lower()
        unknown = (~split.isin(SPLITS)).to_numpy()
        flag(unknown, lambda i: f"split {df['split'].iloc[i]!r} is not one of {SPLITS}")
        df["split"] = split

    if SERIES_COLUMN in df.columns:  # a UID is text; empty = the folder's default choice
        uids = normalise_key(df[SERIES_COLUMN])
        df[SERIES_COLUMN] = uids.where(uids.notna() & (uids != ""), None)
    if "cohort" not in df.columns:
        df["cohort"] = "all"
    df["cohort"] = df["cohort"].fillna("all").astype(str)

    df = df[~bad].reset_index(drop=True)
    if "split" in df.columns:
        per_patient = df.groupby("patient_id")["split"].nunique()
        leaking = per_patient[per_patient > 1]
        if len(leaking):
            pid = leaking.index[0]
            splits = sorted(df.loc[df["patient_id"] == pid, "split"].unique())
            table_fault(
                f"manifest {source}: patient {pid!r} is in splits {splits} "
                f"({len(leaking)} such patient(s)); a patient's scans must share one split"
            )
    if df.empty:
        table_fault(f"manifest {source} has no usable row")
    return df


def assign_patient_splits(
    df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """A ``split`` per row, drawn per *patient* so no patient straddles two splits."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ManifestError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    patients = np.array(sorted(df["patient_id"].unique()))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = round(test_fraction * len(patients))
    n_val = round(val_fraction * len(patients))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[patients[idx]] = (
            "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        )
    return df["patient_id"].map(split_of)


def resolve_image_paths(df: pd.DataFrame, manifest_path: str | Path) -> pd.Series:
    """Relative ``image`` paths are relative to the manifest's folder, not the working dir."""
    base = Path(manifest_path).resolve().parent
    return df["image"].map(lambda p: str(Path(p) if Path(p).is_absolute() else base / p))
