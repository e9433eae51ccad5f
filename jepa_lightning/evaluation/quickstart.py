"""The quickstart study: synthetic cohort -> JEPA pretraining -> finetuning from the JEPA
checkpoint and from scratch -> a table of internal/external test AUROC and AUPRC.

``python -m jepa_lightning.evaluation.quickstart --out runs/quickstart`` (``make quickstart``).
Extra ``--key=value`` arguments are passed to every CLI run (e.g. ``--trainer.max_epochs=2``);
``--pretrain-arg`` / ``--finetune-arg`` pass one to a single stage.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd

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


def finetune_and_test(config: Path, run_dir: Path, extra: list[str]) -> dict[str, float]:
    """Fit a DiagnosisTask, then test the checkpoint with the best validation AUROC."""
    cli = cli_main(_run_args(config, run_dir, extra))
    ckpt = "best" if cli.trainer.checkpoint_callback.best_model_path else "last"
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return metrics


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
    # The pretraining config's ModelCheckpoint decides: its best (by its monitor, the online
    # probe on validation scans) when it has one, else the last epoch.
    best = pretrain.trainer.checkpoint_callback.best_model_path
    ckpt = Path(best) if best else out / "pretrain" / "checkpoints" / "last.ckpt"
    print(f"[quickstart] finetuning from {ckpt}")
    methods = {
        "JEPA-pretrained": ("finetune_jepa", [f"--model.init_args.init_from={ckpt}"]),
        "scratch": ("finetune_scratch", []),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for i, (method, (stage, args)) in enumerate(methods.items(), start=2):
        t0 = time.perf_counter()
        results[method] = []
        for seed in seeds:
            print(f"[quickstart] {i}/3 finetuning: {method}, seed {seed}")
            run_dir = out / stage if len(seeds) == 1 else out / stage / f"seed{seed}"
            results[method].append(
                finetune_and_test(
                    config_dir / "finetune.yaml",
                    run_dir,
                    [*extra, *finetune_extra, *args, f"--seed_everything={seed}"],
                )
            )
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
    text = markdown_table(table)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    report = (
        "# Quickstart results\n\nTest split, best-validation-AUROC checkpoint; mean and sd over "
        f"finetuning seeds {list(seeds)} (one pretraining).\n\n{text}\n\nWall time: {times}.\n"
    )
    (out / "results.md").write_text(report)
    table.to_csv(out / "results.csv", index=False)
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
