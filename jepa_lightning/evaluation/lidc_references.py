"""Reference rows for the LIDC-IDRI cohort, on the same splits and label fractions as a study.

* ``ratings (logistic regression)``: the readers' median semantic ratings (subtlety ...
  texture, without malignancy) and the reader count, standardised, L2 logistic regression;
  ``C`` chosen on the validation AUROC, fitted on the labelled training nodules. The "EHR"
  ceiling: the same readers rated malignancy, so this is what a structured reading carries.
* ``diameter alone``: the largest axial contour diameter as the score (bigger = more
  suspicious, fixed a priori: no fit), the clinical rule of thumb.

AUROC with the patient-level bootstrap 95 % CI (:mod:`jepa_lightning.evaluation.stats`) on
the internal test nodules and the external (thick-slice) cohort.

    python -m jepa_lightning.evaluation.lidc_references --root data/lidc \\
        --label-fractions 0.2 1.0 --out runs/study-lidc/references.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_modules.label_subsets import apply_label_fraction
from data_modules.lidc import RATINGS, nodule_table
from jepa_lightning.evaluation import stats
from jepa_lightning.evaluation.report import markdown_table

RATING_FEATURES = [f"{r}_median" for r in RATINGS] + ["n_readers"]
C_GRID = (0.01, 0.1, 1.0, 10.0)


def ratings_model(train: pd.DataFrame, val: pd.DataFrame):
    """The logistic regression on the ratings whose ``C`` scores best on validation."""
    best, best_auc = None, -np.inf
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        model.fit(train[RATING_FEATURES], train["label"].astype(int))
        auc = roc_auc_score(
            val["label"].astype(int), model.predict_proba(val[RATING_FEATURES])[:, 1]
        )
        if auc > best_auc:
            best, best_auc = model, auc
    return best


def reference_predictions(
    nodules: pd.DataFrame, fraction: float, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], int, int]:
    """``{reference: predictions frame}`` on every test nodule (internal and external), and
    the labelled training patients and nodules the ratings model was fitted on."""
    train = nodules[(nodules["cohort"] == "internal") & (nodules["split"] == "train")]
    train = apply_label_fraction(train, fraction, seed, "LIDC training nodules")
    train = train[train["label"].notna()]
    val = nodules[(nodules["split"] == "val") & nodules["label"].notna()]
    test = nodules[nodules["split"] == "test"]
    model = ratings_model(train, val)
    base = test[["scan_id", "patient_id", "cohort", "label"]]
    return (
        {
            "ratings (logistic regression)": base.assign(
                prob=model.predict_proba(test[RATING_FEATURES])[:, 1]
            ),
            "diameter alone": base.assign(prob=test["diameter_mm"].to_numpy()),
        },
        int(train["patient_id"].nunique()),
        len(train),
    )


def references_table(
    nodules: pd.DataFrame, fractions: list[float], n_resamples: int = 1000
) -> pd.DataFrame:
    rows = []
    for fraction in fractions:
        preds, n_patients, n_train = reference_predictions(nodules, fraction)
        for name, frame in preds.items():
            for cohort in ("internal", "external"):
                part = frame[(frame["cohort"] == cohort) & frame["label"].notna()]
                if part.empty:
                    continue
                s = stats.bootstrap_summary(part, "auroc", n_resamples=n_resamples)
                rows.append(
                    {
                        "reference": name,
                        "label fraction": fraction,
                        "labelled train nodules": n_train if name != "diameter alone" else 0,
                        "cohort": cohort,
                        "test nodules": len(part),
                        "AUROC": f"{s['point']:.3f} [{s['low']:.3f}, {s['high']:.3f}]",
                    }
                )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/lidc", help="the LIDC cohort folder")
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / "nodules.parquet").exists():
        raise SystemExit(
            f"error: {root} holds no LIDC cohort (nodules.parquet); build it with "
            f"python -m data_modules.lidc --root {root}"
        )
    table = references_table(nodule_table(root), args.label_fractions, args.n_resamples)
    text = markdown_table(table)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return table


if __name__ == "__main__":
    main()
