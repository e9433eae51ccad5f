"""What will be trained and evaluated on: patients, scans, labels per split and cohort.

Why: a run whose validation split holds two labelled scans selects its checkpoint on noise,
and nothing said so (issue 24). The data module prints this table at setup and warns; the
archive check (``validate``) previews it before any training.

Warnings: a validation or test split (per cohort) with labelled scans but fewer than
:data:`MIN_EVAL_LABELLED`, or with only one class. An AUROC on fewer than 20 labels has a
95 % interval wider than about +-0.25 — too wide to select a checkpoint or compare methods.
"""

from __future__ import annotations

import pandas as pd

MIN_EVAL_LABELLED = 20
SPLIT_ORDER = ("train", "val", "test")


def split_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, cohort): patients, scans, labelled scans, positives."""
    df = table.assign(
        _labelled=table["label"].notna(), _positive=table["label"].fillna(0).astype(float) == 1
    )
    out = (
        df.groupby(["split", "cohort"], sort=False)
        .agg(
            patients=("patient_id", "nunique"),
            scans=("scan_id", "size"),
            labelled=("_labelled", "sum"),
            positives=("_positive", "sum"),
        )
        .reset_index()
    )
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    out["_order"] = out["split"].map(lambda s: order.get(s, len(order)))
    out = out.sort_values(["_order", "cohort"]).drop(columns="_order").reset_index(drop=True)
    return out.astype({c: int for c in ("patients", "scans", "labelled", "positives")})


def summary_warnings(summary: pd.DataFrame, min_labelled: int = MIN_EVAL_LABELLED) -> list[str]:
    """The evaluation splits too small or one-class to measure a label-based metric on."""
    warnings = []
    for row in summary.itertuples():
        if row.split not in ("val", "test") or row.labelled == 0:
            continue
        where = f"the {row.split} split (cohort {row.cohort!r})"
        if row.labelled < min_labelled:
            warnings.append(
                f"{where} has {row.labelled} labelled scan(s), fewer than {min_labelled}: "
                "AUROC/AUPRC (and a checkpoint chosen on them) are mostly noise; move "
                "labelled patients into it or select on a label-free metric"
            )
        negatives = row.labelled - row.positives
        if row.positives == 0 or negatives == 0:
            only = "negative" if row.positives == 0 else "positive"
            warnings.append(
                f"{where} has only {only} labels ({row.labelled}): AUROC is undefined there; "
                "it needs both classes"
            )
    return warnings


def format_summary(summary: pd.DataFrame) -> str:
    """A Markdown table of :func:`split_summary`."""
    lines = [
        "| split | cohort | patients | scans | labelled | positives |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.split} | {r.cohort} | {r.patients} | {r.scans} | {r.labelled} | {r.positives} |"
        )
    return "\n".join(lines)
