"""What the cells of an EHR column or ``scan_time`` hold, as hospital extracts write them.

Why: an extract holds dates (``2021-03-04``), categories (``M``/``F``,
``current``/``former``/``never``), numbers with units (``72 kg``) and a zoo of missing
markers. Calling all of that "not a number, leave the cell empty" (the old hint) tells the
user to delete good data. Here each column is read once and classified:

* **numbers** stay numbers;
* **ISO dates and datetimes** (``YYYY-MM-DD``, optionally ``THH:MM[:SS]`` and a zone)
  become **days since 1970-01-01** (:data:`DAY_ORIGIN`; fractional for a time of day), the
  one origin for the manifest's ``scan_time`` and every table, so a date in the manifest
  and a date in the EHR table compare. Numbers in ``scan_time`` are days from any origin
  (only differences are used), but one column must not mix dates and numbers;
* **text** makes an EHR column **categorical**: values are compared trimmed and
  lower-cased, the categories are fitted on the training split (:mod:`~data_modules.
  ehr_features`) and travel in the checkpoint; a value unseen in training is missing;
* the **missing tokens** (:data:`MISSING_TOKENS`, any case) and an empty cell are missing.

Refused, each once per column with the number of cells, an example row and the fix: a
number with a unit suffix, a date that is not ISO (``03/04/2021``: day and month cannot be
told apart), dates or numbers mixed with the other kind. A stray text among numbers is a
row fault (the row can be skipped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

DAY_ORIGIN = pd.Timestamp("1970-01-01")
MISSING_TOKENS = frozenset(
    {"", "na", "n/a", "nan", "null", "none", "<na>", "#n/a", "unknown", "not known", "?", "-",
     "."}
)  # fmt: skip
ISO_DATE = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
)
OTHER_DATE = re.compile(r"^\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T].*)?$")
WITH_UNIT = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s.,;:].*)$")


@dataclass
class ParsedColumn:
    """A column's values and kind, and what is wrong with it.

    ``values`` is float64 (numbers, days) or, for ``categorical``, normalised text (object,
    NaN = missing). ``column_faults`` are messages about the whole column (the fix is the
    same for every cell); ``row_faults`` maps a row to the reason that one cell is unusable.
    """

    values: pd.Series
    kind: str  # "numeric" | "date" | "categorical"
    column_faults: list[str] = field(default_factory=list)
    row_faults: dict[int, str] = field(default_factory=dict)


def _rows_text(mask: np.ndarray, raw: pd.Series, limit: int = 3) -> tuple[str, int, object]:
    rows = np.flatnonzero(mask)
    head = ", ".join(str(int(r)) for r in rows[:limit]) + (" ..." if len(rows) > limit else "")
    return head, int(len(rows)), raw.iloc[int(rows[0])]


def to_days(text: pd.Series) -> pd.Series:
    """ISO dates/datetimes -> days since :data:`DAY_ORIGIN` (float; zones to UTC)."""
    stamps = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    return (stamps - DAY_ORIGIN.tz_localize("UTC")) / pd.Timedelta(days=1)


def parse_column(raw: pd.Series, name: str, categorical: bool = True) -> ParsedColumn:
    """Classify and convert ``raw`` (see the module docstring). ``name`` opens every
    message (e.g. ``"EHR column 'ehr_weight'"``); ``categorical=False`` for a column that
    must be numeric or dates (``scan_time``)."""
    raw = raw.reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(raw):  # Parquet timestamps
        stamps = pd.to_datetime(raw, utc=True)
        days = (stamps - DAY_ORIGIN.tz_localize("UTC")) / pd.Timedelta(days=1)
        return ParsedColumn(days.astype("float64"), "date")
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        values = raw.astype("float64")
        out = ParsedColumn(values, "numeric")
        for i in np.flatnonzero(np.isinf(values.to_numpy())):
            out.row_faults[int(i)] = f"{name} is infinite"
        return out
    text = raw.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    text = text.str.strip()
    missing = text.str.lower().isin(MISSING_TOKENS).to_numpy()
    numbers = pd.to_numeric(text.where(~missing), errors="coerce")
    is_num = numbers.notna().to_numpy() & ~missing
    is_iso = text.str.match(ISO_DATE).to_numpy() & ~missing
    is_other_date = text.str.match(OTHER_DATE).to_numpy() & ~missing & ~is_iso & ~is_num
    is_unit = text.str.match(WITH_UNIT).to_numpy() & ~missing & ~is_num & ~is_other_date
    is_unit &= ~is_iso
    is_text = ~(missing | is_num | is_iso | is_other_date | is_unit)
    faults: list[str] = []
    if is_other_date.any():
        rows, n, example = _rows_text(is_other_date, raw)
        faults.append(
            f"{name} holds {n} date(s) not in ISO form (row(s) {rows}: {example!r}); day and "
            "month cannot be told apart: write dates as YYYY-MM-DD (e.g. 2021-03-04), "
            f"they become days since {DAY_ORIGIN.date()}"
        )
    if is_unit.any():
        rows, n, example = _rows_text(is_unit, raw)
        number, unit = WITH_UNIT.match(str(example).strip()).groups()
        faults.append(
            f"{name} holds {n} number(s) with a unit (row(s) {rows}: {example!r}); write the "
            f"number alone ({number}) and put the unit in the column's name (e.g. "
            f"{_unit_name(name, unit)}), converting cells in other units"
        )
    if is_iso.any() and not (is_num | is_text).any():
        values = to_days(text.where(is_iso))
        return ParsedColumn(values.astype("float64"), "date", faults)
    if is_iso.any():
        rows, n, example = _rows_text(is_iso, raw)
        other = np.flatnonzero(is_num | is_text)[0]
        faults.append(
            f"{name} mixes {n} ISO date(s) (row(s) {rows}: {example!r}) with other values "
            f"(row {int(other)}: {raw.iloc[int(other)]!r}); one column holds one kind: all "
            "dates (YYYY-MM-DD) or all numbers"
        )
    if categorical and is_text.any() and not is_num.any():
        values = text.str.lower().where(is_text | is_iso)
        return ParsedColumn(values.astype(object), "categorical", faults)
    out = ParsedColumn(numbers.astype("float64"), "numeric", faults)
    if is_text.any():
        example_num = raw.iloc[int(np.flatnonzero(is_num)[0])] if is_num.any() else None
        where = f" (a numeric column: row {int(np.flatnonzero(is_num)[0])} holds {example_num!r})"
        for i in np.flatnonzero(is_text):
            out.row_faults[int(i)] = (
                f"{name} holds {raw.iloc[int(i)]!r}, which is not a number"
                f"{where if example_num is not None else ''}; write a number"
                f"{'' if categorical else ' (days) or an ISO date (YYYY-MM-DD)'}, or leave "
                "the cell empty (or one of NA, unknown, ?) when it is missing"
            )
    return out


def _unit_name(name: str, unit: str) -> str:
    """``EHR column 'ehr_weight'`` + ``kg`` -> ``ehr_weight_kg``."""
    match = re.search(r"'([^']+)'", name)
    column = match.group(1) if match else "column"
    suffix = re.sub(r"[^0-9a-zA-Z]+", "_", unit.replace("%", "pct").replace("°", "deg")).strip("_")
    return f"{column}_{suffix.lower()}" if suffix else column


def time_values(column: pd.Series) -> np.ndarray:
    """``scan_time`` as float64 days (ISO dates -> days since :data:`DAY_ORIGIN`), NaN where
    missing or not usable (the checks name those rows)."""
    parsed = parse_column(column, "scan_time", categorical=False)
    values = parsed.values.to_numpy(dtype="float64", na_value=np.nan).copy()
    for i in parsed.row_faults:
        values[i] = np.nan
    values[~np.isfinite(values)] = np.nan
    return values
