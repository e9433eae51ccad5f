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


def results_table(results: dict[str, dict[str, float]], cohorts: list[str]) -> pd.DataFrame:
    rows = []
    for method, metrics in results.items():
        for cohort in cohorts:
            rows.append(
                {
                    "method": method,
                    "cohort": cohort,
                    "n_scans": int(metrics.get(f"test/{cohort}/n_scans", 0)),
                    "AUROC": metrics.get(f"test/{cohort}/auroc", float("nan")),
                    "AUPRC": metrics.get(f"test/{cohort}/auprc", float("nan")),
                }
            )
    return pd.DataFrame(rows)


def run_quickstart(
    out: str | Path,
    extra: list[str] | None = None,
    pretrain_extra: list[str] | None = None,
    finetune_extra: list[str] | None = None,
    config_dir: str | Path = CONFIG_DIR,
) -> pd.DataFrame:
    """Run the three stages into ``out/<stage>`` and return the results table.

    The stage folders are this runner's own output and are replaced on every run; the
    cohort (``data.init_args.root``) is reused when its settings match.
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
    cli_main(_run_args(config_dir / "pretrain.yaml", out / "pretrain", extra + pretrain_extra))
    timings["pretrain"] = time.perf_counter() - t0
    ckpt = out / "pretrain" / "checkpoints" / "last.ckpt"
    results = {}
    t0 = time.perf_counter()
    print("[quickstart] 2/3 finetuning from the JEPA checkpoint")
    results["JEPA-pretrained"] = finetune_and_test(
        config_dir / "finetune.yaml",
        out / "finetune_jepa",
        [*extra, *finetune_extra, f"--model.init_args.init_from={ckpt}"],
    )
    timings["finetune_jepa"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print("[quickstart] 3/3 finetuning from scratch")
    results["scratch"] = finetune_and_test(
        config_dir / "finetune.yaml", out / "finetune_scratch", [*extra, *finetune_extra]
    )
    timings["finetune_scratch"] = time.perf_counter() - t0
    cohorts = sorted(
        {k.split("/")[1] for m in results.values() for k in m if k.startswith("test/")}
    )
    table = results_table(results, cohorts)
    text = markdown_table(table)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    report = f"# Quickstart results\n\nTest split, best-validation-AUROC checkpoint.\n\n{text}\n\nWall time: {times}.\n"
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
    args, extra = parser.parse_known_args(argv)
    return run_quickstart(args.out, extra, args.pretrain_arg, args.finetune_arg, args.config_dir)


if __name__ == "__main__":
    main()
