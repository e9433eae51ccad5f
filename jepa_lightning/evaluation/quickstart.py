"""The quickstart study: synthetic cohort -> JEPA pretraining -> finetuning from the JEPA
checkpoint and from scratch -> a table of internal/external test AUROC and AUPRC, and the
paired difference JEPA-init minus scratch with a patient-level bootstrap CI.

The pretraining checkpoint is always ``last.ckpt``: picking the best epoch by probe would
hide a collapse later in the run. Its health is reported beside the table: the image-only
effective rank over the run, the last vs best online image-only probe, and the offline
probe of the final encoder against the same probe on the random-init encoder.

``python -m jepa_lightning.evaluation.quickstart --out runs/quickstart`` (``make quickstart``).
Extra ``--key=value`` arguments are passed to every CLI run (e.g. ``--trainer.max_epochs=2``);
``--pretrain-arg`` / ``--finetune-arg`` pass one to a single stage.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from jepa_lightning.evaluation.stats import (
    align,
    bootstrap_distribution,
    paired_p_value,
    patient_bootstrap,
    percentile_ci,
)
from jepa_lightning.evaluation.tables import markdown_table
from jepa_lightning.main import main as cli_main

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "quickstart"
STAGES = ("pretrain", "finetune_jepa", "finetune_scratch")


def _run_args(config: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        "fit",
        "--config", str(config),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        *extra,
    ]  # fmt: skip


def finetune_and_test(
    config: Path, run_dir: Path, extra: list[str]
) -> tuple[dict[str, float], pd.DataFrame]:
    """Fit a DiagnosisTask, then test the checkpoint with the best validation AUROC and
    predict the test split with it (``<run_dir>/predictions.parquet``, one row per scan)."""
    cli = cli_main(_run_args(config, run_dir, extra))
    ckpt = "best" if cli.trainer.checkpoint_callback.best_model_path else "last"
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    predictions = pd.read_parquet(Path(cli.trainer.default_root_dir) / "predictions.parquet")
    return metrics, predictions


def seed_averaged_delta(
    model: list[pd.DataFrame],
    reference: list[pd.DataFrame],
    name: str = "auroc",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over seeds of ``metric(model seed)`` minus mean over seeds of
    ``metric(reference seed)``, with a patient-level paired bootstrap CI and p-value: each
    resample draws patients once and scores every seed's predictions on it, so the spread
    covers both the test patients and the finetuning seeds' average."""
    frames = {f"m{i}": f for i, f in enumerate(model)}
    frames |= {f"r{i}": f for i, f in enumerate(reference)}
    table = align(frames)
    table = table[table["label"].notna()]
    label = table["label"].to_numpy().astype(int)
    probs = table[list(frames)].to_numpy()
    k = len(model)
    dist = bootstrap_distribution(
        name, probs, label, patient_bootstrap(table["patient_id"], n_resamples, seed)
    )
    delta = dist[:, :k].mean(1) - dist[:, k:].mean(1)
    point = bootstrap_distribution(name, probs, label, [np.arange(len(label))])[0]
    low, high = percentile_ci(delta)
    return {
        "delta": float(point[:k].mean() - point[k:].mean()),
        "low": low,
        "high": high,
        "p_value": paired_p_value(delta),
    }


def comparison_table(
    predictions: dict[str, list[pd.DataFrame]], cohorts: list[str], n_resamples: int = 1000
) -> pd.DataFrame:
    """JEPA-pretrained minus scratch, per cohort: ΔAUROC, its 95 % CI and p."""
    rows = []
    for cohort in cohorts:

        def of(frames: list[pd.DataFrame], cohort: str = cohort) -> list[pd.DataFrame]:
            return [f[f["cohort"] == cohort] for f in frames]

        d = seed_averaged_delta(
            of(predictions["JEPA-pretrained"]), of(predictions["scratch"]), "auroc", n_resamples
        )
        rows.append(
            {
                "comparison": "JEPA-pretrained - scratch",
                "cohort": cohort,
                "dAUROC": d["delta"],
                "CI_low": d["low"],
                "CI_high": d["high"],
                "p": d["p_value"],
            }
        )
    return pd.DataFrame(rows)


def pretraining_health(cli) -> dict[str, float]:
    """What the pretraining run says about collapse, from its logged metrics: the smallest
    image-only validation effective rank (and the embedding width), the last and the best
    online image-only probe, and the offline probe of the final vs the random-init encoder."""
    health: dict[str, float] = {"embed_dim": float(cli.model.hparams.embed_dim)}
    log_dir = getattr(cli.trainer.logger, "log_dir", None)
    metrics_csv = Path(log_dir) / "metrics.csv" if log_dir else None
    if metrics_csv is not None and metrics_csv.exists():
        m = pd.read_csv(metrics_csv)
        for key, column in (("effective_rank", "val/effective_rank"), ("probe", "val/probe_auroc")):
            if column in m:
                values = m[column].dropna()
                if len(values):
                    health[f"{key}_min"] = float(values.min())
                    health[f"{key}_best"] = float(values.max())
                    health[f"{key}_last"] = float(values.iloc[-1])
    health.update(getattr(cli.model, "reference_values", {}))
    return health


def health_text(h: dict[str, float]) -> str:
    def get(key: str) -> str:
        v = h.get(key, float("nan"))
        return "—" if np.isnan(v) else f"{v:.3f}"

    return (
        f"Pretraining (last.ckpt): image-only effective rank min {get('effective_rank_min')} "
        f"of width {int(h['embed_dim'])} over the validations (random init "
        f"{get('ref/effective_rank')}, final {get('final/effective_rank')}); online image-only "
        f"probe last {get('probe_last')} vs best {get('probe_best')}; offline image-only probe "
        f"(logistic regression, labelled train -> val) random init {get('ref/probe_auroc')} -> "
        f"final {get('final/probe_auroc')}."
    )


def results_table(results: dict[str, list[dict[str, float]]], cohorts: list[str]) -> pd.DataFrame:
    """One row per (method, cohort); AUROC/AUPRC as mean and sd over finetuning seeds."""
    rows = []
    for method, per_seed in results.items():
        for cohort in cohorts:
            auroc = pd.Series([m.get(f"test/{cohort}/auroc", float("nan")) for m in per_seed])
            auprc = pd.Series([m.get(f"test/{cohort}/auprc", float("nan")) for m in per_seed])
            rows.append(
                {
                    "method": method,
                    "cohort": cohort,
                    "n_scans": int(per_seed[0].get(f"test/{cohort}/n_scans", 0)),
                    "seeds": len(per_seed),
                    "AUROC": auroc.mean(),
                    "AUROC_sd": auroc.std() if len(per_seed) > 1 else float("nan"),
                    "AUPRC": auprc.mean(),
                    "AUPRC_sd": auprc.std() if len(per_seed) > 1 else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def run_quickstart(
    out: str | Path,
    extra: list[str] | None = None,
    pretrain_extra: list[str] | None = None,
    finetune_extra: list[str] | None = None,
    config_dir: str | Path = CONFIG_DIR,
    seeds: tuple[int, ...] = (0,),
) -> pd.DataFrame:
    """Run the three stages into ``out/<stage>`` and return the results table.

    The stage folders are this runner's own output and are replaced on every run; the
    cohort (``data.init_args.root``) is reused when its settings match. Each finetuning is
    repeated for every seed in ``seeds`` (head initialisation and data order), and the
    table reports the mean and sd over them.
    """
    out, config_dir = Path(out), Path(config_dir)
    extra, pretrain_extra, finetune_extra = extra or [], pretrain_extra or [], finetune_extra or []
    for stage in STAGES:
        if (out / stage).exists():
            print(f"[quickstart] replacing the previous run in {out / stage}")
            shutil.rmtree(out / stage)
    timings = {}
    t0 = time.perf_counter()
    print("[quickstart] 1/3 JEPA pretraining")
    pretrain = cli_main(
        _run_args(config_dir / "pretrain.yaml", out / "pretrain", extra + pretrain_extra)
    )
    timings["pretrain"] = time.perf_counter() - t0
    health = pretraining_health(pretrain)
    # Always the last epoch: a best-epoch pick by probe would hide a later collapse.
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[quickstart] finetuning from {ckpt}")
    methods = {
        "JEPA-pretrained": ("finetune_jepa", [f"--model.init_args.init_from={ckpt}"]),
        "scratch": ("finetune_scratch", []),
    }
    results: dict[str, list[dict[str, float]]] = {}
    predictions: dict[str, list[pd.DataFrame]] = {}
    for i, (method, (stage, args)) in enumerate(methods.items(), start=2):
        t0 = time.perf_counter()
        results[method], predictions[method] = [], []
        for seed in seeds:
            print(f"[quickstart] {i}/3 finetuning: {method}, seed {seed}")
            run_dir = out / stage if len(seeds) == 1 else out / stage / f"seed{seed}"
            metrics, preds = finetune_and_test(
                config_dir / "finetune.yaml",
                run_dir,
                [*extra, *finetune_extra, *args, f"--seed_everything={seed}"],
            )
            results[method].append(metrics)
            predictions[method].append(preds)
        timings[stage] = time.perf_counter() - t0
    cohorts = sorted(
        {
            k.split("/")[1]
            for runs in results.values()
            for m in runs
            for k in m
            if k.startswith("test/")
        }
    )
    table = results_table(results, cohorts)
    deltas = comparison_table(predictions, cohorts)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    report = (
        "# Quickstart results\n\nTest split, best-validation-AUROC checkpoint; mean and sd over "
        f"finetuning seeds {list(seeds)} (one pretraining, its last.ckpt).\n\n"
        f"{markdown_table(table)}\n\nPaired difference (mean over seeds of each model's AUROC; "
        "95 % CI and p from 1000 patient-level bootstrap resamples of the test set):\n\n"
        f"{markdown_table(deltas)}\n\n{health_text(health)}\n\nWall time: {times}.\n"
    )
    (out / "results.md").write_text(report)
    table.to_csv(out / "results.csv", index=False)
    deltas.to_csv(out / "comparison.csv", index=False)
    print("\n" + report)
    print(f"[quickstart] table written to {out / 'results.md'} and {out / 'results.csv'}")
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/quickstart", help="run folder (stage subfolders are replaced)"
    )
    parser.add_argument(
        "--config-dir", default=str(CONFIG_DIR), help="folder with pretrain.yaml and finetune.yaml"
    )
    parser.add_argument(
        "--pretrain-arg", action="append", default=[], help="CLI argument for pretraining only"
    )
    parser.add_argument(
        "--finetune-arg", action="append", default=[], help="CLI argument for finetuning only"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="finetuning seeds (table: mean and sd)"
    )
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table and its plot to W&B"
    )
    args, extra = parser.parse_known_args(argv)
    table = run_quickstart(
        args.out, extra, args.pretrain_arg, args.finetune_arg, args.config_dir, tuple(args.seeds)
    )
    if args.wandb:
        from jepa_lightning.evaluation.wandb_results import log_results

        log_results(table, args.out, group="quickstart", tags=["quickstart"])
    return table


if __name__ == "__main__":
    main()
