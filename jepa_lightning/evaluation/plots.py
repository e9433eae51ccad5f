"""Figures of a study: ROC curves per cohort, a 2-D t-SNE map of backbone embeddings, and
the synthetic study's AUROC against each knob.

The first two read prediction tables (``scan_id, patient_id, cohort, label, prob, emb_*``)
written by :class:`~jepa_lightning.callbacks.PredictionWriter`, the third the results table
of :func:`~jepa_lightning.evaluation.report.summarise`; nothing here runs a model.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_roc  # noqa: E402

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if c.startswith("emb_")]
    return sorted(cols, key=lambda c: int(c.split("_")[1]))


def roc_figure(
    curves: dict[float, dict[str, list[pd.DataFrame]]],
    cohort: str,
    path: str | Path,
    aurocs: dict[tuple[float, str], tuple[float, float]] | None = None,
) -> Path:
    """One panel per label fraction; per model one colour, one line per subset (the first
    labelled, ``AUROC mean ± sd`` in the legend when ``aurocs`` gives it)."""
    path = Path(path)
    fractions = sorted(curves)
    fig, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 4.2), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for i, (model, frames) in enumerate(curves[fraction].items()):
            colour = COLOURS[i % len(COLOURS)]
            for j, frame in enumerate(frames):
                frame = frame[frame["label"].notna()]
                y = torch.tensor(frame["label"].to_numpy(dtype=np.int64))
                if y.min() == y.max():
                    continue
                fpr, tpr, _ = binary_roc(torch.tensor(frame["prob"].to_numpy(dtype=np.float32)), y)
                label = None
                if j == 0:
                    label = model
                    if aurocs and (fraction, model) in aurocs:
                        mean, sd = aurocs[(fraction, model)]
                        label += f" ({mean:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}") + ")"
                ax.plot(fpr, tpr, color=colour, alpha=1.0 if j == 0 else 0.35, lw=1.4, label=label)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(
            title=f"{cohort}: {fraction:.0%} of labels",
            xlabel="false positive rate",
            ylabel="true positive rate",
            xlim=(0, 1),
            ylim=(0, 1.01),
            aspect="equal",
        )
        ax.legend(fontsize=7, loc="lower right", title="AUROC mean ± sd", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 2-D t-SNE (scikit-learn) of standardised embeddings."""
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def tsne_figure(
    frames: dict[str, pd.DataFrame], path: str | Path, title: str, seed: int = 0
) -> Path:
    """One t-SNE panel per model: points coloured by label (grey = unlabelled), marker by
    cohort, so one sees whether the backbone separates the classes without the head."""
    path = Path(path)
    n = len(frames)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    markers = ["o", "^", "s", "D", "v"]
    for ax, (model, frame) in zip(axes.flat, frames.items(), strict=False):
        cols_ = embedding_columns(frame)
        if len(frame) < 5 or not cols_:
            ax.set_title(f"{model}: too few scans for t-SNE")
            continue
        xy = tsne_2d(frame[cols_].to_numpy(), seed)
        for k, cohort in enumerate(sorted(frame["cohort"].unique())):
            in_cohort = (frame["cohort"] == cohort).to_numpy()
            for value, colour, name in ((0.0, "tab:blue", "benign"), (1.0, "tab:red", "malignant")):
                sel = in_cohort & (frame["label"] == value).to_numpy()
                ax.scatter(*xy[sel].T, s=10, c=colour, marker=markers[k % len(markers)],
                           alpha=0.7, label=f"{cohort}: {name}")  # fmt: skip
            sel = in_cohort & frame["label"].isna().to_numpy()
            if sel.any():
                ax.scatter(*xy[sel].T, s=8, c="lightgrey", marker=markers[k % len(markers)],
                           label=f"{cohort}: unlabelled")  # fmt: skip
        ax.set_title(model, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _is_number(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def knob_figure(
    table: pd.DataFrame, knobs: dict[str, list[str]], title: str, path: str | Path
) -> Path:
    """AUROC (mean over subsets, CI band) against each knob's values (``knobs``: knob ->
    its ``x`` values, as in the table's ``x`` column), at the largest label fraction: one
    row of panels per knob, one column per cohort, one line per model. Numeric values sit
    at their positions on the axis, others evenly spaced."""
    path = Path(path)
    cohorts = sorted(table["cohort"].unique())
    fig, axes = plt.subplots(
        len(knobs),
        len(cohorts),
        figsize=(4.6 * len(cohorts), 3.4 * len(knobs)),
        squeeze=False,
        layout="constrained",  # leaves room for the suptitle (tight_layout overlapped it)
    )
    fraction = table["label_pct"].max()
    for r, (knob, xs) in enumerate(knobs.items()):
        pos = [float(x) for x in xs] if all(map(_is_number, xs)) else list(range(len(xs)))
        for c, cohort in enumerate(cohorts):
            ax = axes[r][c]
            sub = table[
                (table["knob"] == knob)
                & (table["cohort"] == cohort)
                & (table["label_pct"] == fraction)
            ]
            for i, ((method, protocol), g) in enumerate(
                sub.groupby(["method", "protocol"], sort=False)
            ):
                g = g.set_index("x").loc[xs]
                colour = COLOURS[i % len(COLOURS)]
                ax.plot(
                    pos, g["auroc_mean"], marker="o", color=colour, label=f"{method} / {protocol}"
                )
                ax.fill_between(
                    pos, g["auroc_ci_low"], g["auroc_ci_high"], color=colour, alpha=0.15
                )
            ax.axhline(0.5, ls=":", color="grey", lw=1)
            ax.set_xticks(pos, xs)
            ax.set(title=f"{cohort}", xlabel=knob, ylabel="AUROC")
            if r == 0 and c == len(cohorts) - 1:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
