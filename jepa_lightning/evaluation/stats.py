"""AUROC / AUPRC with patient-level bootstrap confidence intervals and paired tests.

Why patient-level: scans of one patient are correlated, so resampling scans would make the
intervals too narrow. Each bootstrap resample draws *patients* with replacement and keeps
all their scans. Why one shared set of resamples: the CI of a model and its paired test
against a reference then use the same resampled test sets, which is what makes the test
paired (the models' errors on the same patients cancel in the difference). A model may be
several prediction tables (finetuning seeds, label subsets): it is their mean, and each
resample scores all of them on the same patients. :func:`bootstrap` scores every model of a
table at once (what the study report uses); :func:`bootstrap_summary` and
:func:`paired_bootstrap` are the one-model and one-pair views of it.

The metrics are torchmetrics' functional ``binary_auroc`` and ``binary_average_precision``
(AUPRC as average precision, the usual estimator). A resample whose scans are all of one
class has no AUROC; it is left out and counted (``n_valid``).

Paired p-value: two-sided percentile bootstrap test of ``delta = metric(model) -
metric(reference)``: ``p = min(1, 2 * min(P(delta <= 0), P(delta >= 0)))`` over the valid
resamples, with the ``(count + 1) / (n + 1)`` correction so ``p`` is never 0. It is the test
dual to the percentile CI of ``delta`` (p < 0.05 roughly when the 95 % CI excludes 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "auroc": lambda p, y: binary_auroc(p, y, validate_args=False),
    "auprc": lambda p, y: binary_average_precision(p, y, validate_args=False),
}


class ScanMismatchError(ValueError):
    """Two models' predictions are not on the same scans, so they cannot be paired."""


def metric(name: str, prob: np.ndarray, label: np.ndarray) -> float:
    """``auroc`` or ``auprc`` of probabilities against 0/1 labels; NaN with one class only."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    label = np.asarray(label)
    if label.size == 0 or label.min() == label.max():
        return float("nan")
    prob_t = torch.tensor(np.asarray(prob, dtype=np.float64))  # float32 would tie distinct scores
    return float(METRICS[name](prob_t, torch.tensor(label.astype(np.int64))))


def one_class_warning(where: str, label: np.ndarray | Sequence[float]) -> str | None:
    """A warning for a set of labels holding one class only (or none), else None.

    AUROC needs both classes and AUPRC a positive; torchmetrics returns ``0.0`` (with a
    generic warning) for a one-class set, which reads like a real figure in a table. Callers
    report NaN instead, with this message naming ``where`` and the class counts."""
    label = np.asarray(label, dtype=float)
    label = label[np.isfinite(label)]
    n_pos, n_neg = int((label == 1).sum()), int((label == 0).sum())
    if n_pos and n_neg:
        return None
    return (
        f"{where} has {n_pos} positive and {n_neg} negative labelled scans: AUROC (and AUPRC"
        f"{'' if n_pos else ', without a positive'}) is undefined and reported as NaN, with "
        "NaN bootstrap CIs; add scans of the missing class or leave this cohort out"
    )


def patient_bootstrap(patient_ids: Sequence[str], n_resamples: int, seed: int) -> list[np.ndarray]:
    """``n_resamples`` scan-index arrays, each the scans of ``n_patients`` patients drawn with
    replacement (a patient drawn twice contributes their scans twice)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    codes, uniques = pd.factorize(pd.Series(list(patient_ids), dtype=str), sort=True)
    by_patient = [np.flatnonzero(codes == k) for k in range(len(uniques))]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniques), size=(n_resamples, len(uniques)))
    return [np.concatenate([by_patient[k] for k in row]) for row in draws]


def bootstrap_distribution(
    name: str, probs: np.ndarray, label: np.ndarray, resamples: list[np.ndarray]
) -> np.ndarray:
    """``[R, M]``: the metric of each of ``M`` models (columns of ``probs [N, M]``) on each
    resample; a row is NaN where the resample has one class only."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(label), -1)  # no ties from rounding
    label = np.asarray(label)
    out = np.full((len(resamples), probs.shape[1]), np.nan)
    for r, idx in enumerate(resamples):
        y = label[idx]
        if y.min() == y.max():
            continue
        yt = torch.as_tensor(y).long()
        for m in range(probs.shape[1]):
            out[r, m] = float(METRICS[name](torch.from_numpy(probs[idx, m]), yt))
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite ``samples``."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_p_value(delta: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``delta`` (model minus reference) being 0."""
    delta = delta[np.isfinite(delta)]
    if delta.size == 0:
        return float("nan")
    n = delta.size
    below = (np.sum(delta <= 0) + 1) / (n + 1)
    above = (np.sum(delta >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


def align(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table with ``scan_id, patient_id, label`` and one ``prob`` column per name, after
    checking every frame has exactly the same scans with the same patient and label."""
    names = list(frames)
    if not names:
        raise ValueError("align needs at least one predictions table")
    first = names[0]
    base = frames[first][["scan_id", "patient_id", "label"]].copy()
    if base["scan_id"].duplicated().any():
        dup = base.loc[base["scan_id"].duplicated(), "scan_id"].tolist()[:5]
        raise ScanMismatchError(f"predictions of {first!r} repeat scans {dup}")
    base = base.sort_values("scan_id").reset_index(drop=True)
    base[first] = frames[first].sort_values("scan_id")["prob"].to_numpy()
    scans = set(base["scan_id"])
    for name in names[1:]:
        other = frames[name].sort_values("scan_id").reset_index(drop=True)
        theirs = set(other["scan_id"])
        if theirs != scans or len(other) != len(base):
            raise ScanMismatchError(
                f"{name!r} and {first!r} were predicted on different scans "
                f"(only in {name!r}: {sorted(theirs - scans)[:5]}, only in {first!r}: "
                f"{sorted(scans - theirs)[:5]}); pair models on the same test set"
            )
        for col in ("patient_id", "label"):
            a, b = other[col].to_numpy(), base[col].to_numpy()
            same = (a == b) | (pd.isna(a) & pd.isna(b))
            if not same.all():
                scan = other.loc[~same, "scan_id"].iloc[0]
                raise ScanMismatchError(
                    f"{name!r} and {first!r} disagree on the {col} of scan {scan!r}"
                )
        base[name] = other["prob"].to_numpy()
    return base


Frames = pd.DataFrame | Sequence[pd.DataFrame]


@dataclass
class Bootstrap:
    """Several models scored on one shared set of patient-level resamples of the same scans.

    A model is the mean over its members (finetuning seeds, label subsets): its point
    estimate is the mean of the members' metrics, and each resample scores every member on
    the same patients, so its CI covers both the test patients and the seeds' average. One
    object serves a whole table: every CI and every paired test in it uses the same resampled
    test sets (what makes the tests paired), and the metrics are computed once."""

    label: np.ndarray  # [N] 0/1 of the labelled scans every model was scored on
    n_patients: int
    points: dict[str, dict[str, np.ndarray]]  # metric -> model -> [members]
    samples: dict[str, dict[str, np.ndarray]]  # metric -> model -> [R], mean over members

    def summary(self, name: str, model: str, level: float = 0.95) -> dict[str, float]:
        """Mean and sd over the members, percentile CI of the mean, valid resamples."""
        points, samples = self.points[name][model], self.samples[name][model]
        low, high = percentile_ci(samples, level)
        return {
            "mean": float(np.mean(points)),
            "sd": float(np.std(points, ddof=1)) if len(points) > 1 else float("nan"),
            "low": low,
            "high": high,
            "n_valid": int(np.isfinite(samples).sum()),
        }

    def paired(self, name: str, model: str, reference: str, level: float = 0.95) -> dict:
        """``model - reference`` (each the mean over its members) on the same scans: the
        difference, its CI and the two-sided paired p-value."""
        points = self.points[name]
        delta = self.samples[name][model] - self.samples[name][reference]
        low, high = percentile_ci(delta, level)
        return {
            "delta": float(points[model].mean() - points[reference].mean()),
            "low": low,
            "high": high,
            "p_value": paired_p_value(delta),
            "n_valid": int(np.isfinite(delta).sum()),
        }


def bootstrap(
    models: dict[str, Frames],
    names: Sequence[str] = ("auroc", "auprc"),
    n_resamples: int = 1000,
    seed: int = 0,
) -> Bootstrap:
    """Score every model (a predictions table, or a list of them to average) on the same
    ``n_resamples`` patient-level resamples; unlabelled scans are left out. Raises
    :class:`ScanMismatchError` unless all tables hold the same scans."""
    members = {m: [f] if isinstance(f, pd.DataFrame) else list(f) for m, f in models.items()}
    columns = {f"{m}|{i}": f for m, fs in members.items() for i, f in enumerate(fs)}
    if len(columns) == 1:  # nothing to pair: keep the table as it is (repeated scans too)
        ((column, frame),) = columns.items()
        table = frame[["patient_id", "label"]].assign(**{column: frame["prob"].to_numpy()})
    else:
        table = align(columns)
    table = table[table["label"].notna()]
    label = table["label"].to_numpy().astype(int)
    probs = table[list(columns)].to_numpy()
    resamples = patient_bootstrap(table["patient_id"], n_resamples, seed)
    points: dict[str, dict[str, np.ndarray]] = {}
    samples: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        dist = bootstrap_distribution(name, probs, label, resamples)
        points[name], samples[name] = {}, {}
        start = 0
        for model, fs in members.items():
            idx = list(range(start, start + len(fs)))
            start += len(fs)
            points[name][model] = np.array([metric(name, probs[:, i], label) for i in idx])
            samples[name][model] = dist[:, idx].mean(1)
    return Bootstrap(label, table["patient_id"].nunique(), points, samples)


def bootstrap_summary(
    frames: Frames,
    name: str = "auroc",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Point estimate (mean over ``frames`` when several) and patient-level bootstrap CI of
    one model's predictions (``patient_id``, ``label``, ``prob``)."""
    s = bootstrap({"model": frames}, [name], n_resamples, seed).summary(name, "model", level)
    return {"point": s["mean"], "low": s["low"], "high": s["high"], "n_valid": s["n_valid"]}


def paired_bootstrap(
    model: Frames,
    reference: Frames,
    name: str = "auroc",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """``metric(model) - metric(reference)`` on the same scans (each averaged over its
    tables when given several, e.g. finetuning seeds): the difference, its patient-level
    bootstrap CI and the two-sided paired p-value. Raises :class:`ScanMismatchError` when
    they were not predicted on the same scans."""
    b = bootstrap({"model": model, "reference": reference}, [name], n_resamples, seed)
    return b.paired(name, "model", "reference", level)
