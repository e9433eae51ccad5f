"""Results tables and plots to Weights & Biases (a run of its own, ``job_type=results``).

Training runs log their curves through ``WandbLogger`` (experiments/logging/wandb.yaml); the
study-level outputs -- the results table and its plot -- are made after all training runs,
so they go to one results run that groups with them by ``group``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from jepa_lightning.loggers import wandb_should_be_offline  # noqa: E402


def results_view(table: pd.DataFrame) -> pd.DataFrame:
    """A study's results table (:func:`~jepa_lightning.evaluation.report.summarise`) as
    W&B shows it: one row per model and cohort (the label fraction in the model's name when
    the study has several), mean and sd over subsets."""
    several = table["label_pct"].nunique() > 1
    method = table["method"] + " / " + table["protocol"]
    if several:
        method = method + " @ " + table["label_pct"].map(lambda f: f"{f:g} %")
    return pd.DataFrame(
        {
            "method": method,
            "cohort": table["cohort"],
            "n_scans": table["n_scans"],
            "AUROC": table["auroc_mean"],
            "AUROC_sd": table["auroc_sd"],
            "AUPRC": table["auprc_mean"],
            "AUPRC_sd": table["auprc_sd"],
        }
    )


def auroc_plot(table: pd.DataFrame, path: Path) -> Path:
    """Bar chart of AUROC (± sd when present) per method and cohort, written to ``path``."""
    cohorts = sorted(table["cohort"].unique())
    methods = list(dict.fromkeys(table["method"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cohorts) * len(methods) / 2, 3.2))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("cohort").reindex(cohorts)
        err = rows.get("AUROC_sd")
        ax.bar([c + i * width for c in range(len(cohorts))], rows["AUROC"], width, yerr=err,
               label=method, capsize=3)  # fmt: skip
    ax.set_xticks([c + width * (len(methods) - 1) / 2 for c in range(len(cohorts))], cohorts)
    ax.set_ylabel("test AUROC")
    ax.set_ylim(0.0, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_results(
    table: pd.DataFrame,
    out_dir: str | Path,
    project: str = "jepa-lightning",
    group: str | None = None,
    tags: list[str] | None = None,
    offline: bool | None = None,
) -> str:
    """Log ``table`` as a W&B Table and its AUROC plot as an image; returns the run dir.
    Offline (``wandb sync`` later) when no API key is configured, as the logger is."""
    import wandb

    out_dir = Path(out_dir)
    plot = auroc_plot(table, out_dir / "results_auroc.png")
    run = wandb.init(
        project=project,
        group=group,
        job_type="results",
        tags=tags,
        dir=str(out_dir),
        mode="offline" if (wandb_should_be_offline() if offline is None else offline) else "online",
        reinit="finish_previous",
    )
    try:
        run.log(
            {
                "results/table": wandb.Table(dataframe=table.reset_index(drop=True)),
                "results/auroc": wandb.Image(str(plot)),
            }
        )
        return run.dir
    finally:
        run.finish()
