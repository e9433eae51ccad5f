"""Run a study grid (method x protocol x label fraction x subset) and write its table and plots.

``python -m jepa_lightning.evaluation.study --config experiments/studies/quick.yaml``
(``make study-quick``); ``make quickstart`` is the study ``experiments/studies/quickstart.yaml``.
``--dry-run`` lists the runs and whether each is done; ``--wandb`` also logs the table and
its AUROC plot to a W&B results run.

The YAML is described in :mod:`~jepa_lightning.evaluation.study_spec`; running and resuming
(``done.json`` markers) in :mod:`~jepa_lightning.evaluation.runs`; the statistics in
:mod:`~jepa_lightning.evaluation.stats` and the tables in
:mod:`~jepa_lightning.evaluation.report`. Every number is scored from the runs' saved
predictions, so a second invocation skips the finished runs and only remakes the outputs.

Outputs in ``out``: ``results.csv`` and ``results.md`` (per method, protocol, label
fraction and cohort: AUROC/AUPRC mean ± sd over subsets, patient-level bootstrap 95 % CI of
that mean, paired bootstrap p-value against the study's reference model; the study's
comparisons, ``comparisons.csv``; each pretraining's collapse measures), ``roc_<cohort>.png``
and ``tsne.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from jepa_lightning.evaluation import report, runs
from jepa_lightning.evaluation.plots import roc_figure, tsne_figure
from jepa_lightning.evaluation.study_spec import Run, Study, load_study, restrict_methods


def write_outputs(
    study: Study, frames: dict[Run, pd.DataFrame], wall_s: float | None = None
) -> pd.DataFrame:
    """Score the saved predictions: ``results.csv``/``.md``, ``comparisons.csv``, figures."""
    boots = report.bootstraps(study, frames)
    table = report.summarise(study, boots)
    table.to_csv(study.out / "results.csv", index=False)
    models = study.models()
    figures: list[Path] = []
    for cohort in sorted(table["cohort"].unique()):
        curves = {
            f: {
                report.model_name(m, p): [
                    report.in_cohort(frames[Run(m, p, f, s)], cohort) for s in study.subsets
                ]
                for m, p in models
            }
            for f in study.label_fractions
        }
        aurocs = {
            (r.label_pct / 100, report.model_name(r.method, r.protocol)): (r.auroc_mean, r.auroc_sd)
            for r in table[table["cohort"] == cohort].itertuples()
        }
        figures.append(roc_figure(curves, cohort, study.out / f"roc_{cohort}.png", aurocs))
    fraction = study.tsne_fraction or max(study.label_fractions)
    subset = study.subsets[0]
    figures.append(
        tsne_figure(
            {report.model_name(m, p): frames[Run(m, p, fraction, subset)] for m, p in models},
            study.out / "tsne.png",
            f"t-SNE of backbone embeddings of the predicted scans ({fraction:.0%} labels, "
            f"subset {subset})",
            seed=study.bootstrap_seed,
        )
    )
    pairs = None
    if study.comparisons:
        pairs = report.comparisons(study, boots, study.comparisons)
        pairs.to_csv(study.out / "comparisons.csv", index=False)
    health = {
        m.name: h
        for m in study.methods.values()
        if m.pretrain and (h := runs.pretraining_health(study, m.name)) is not None
    }
    text = report.study_markdown(study, table, pairs, figures, health, wall_s)
    (study.out / "results.md").write_text(text)
    return table


def dry_run(study: Study) -> None:
    status = runs.run_status(study)
    for method in study.methods.values():
        if method.pretrain:
            done = runs.read_marker(runs.pretrain_folder(study, method.name)) is not None
            print(f"{'done' if done else 'todo'}  pretrain {method.name}: {method.pretrain}")
    for run, done in status:
        print(f"{'done' if done else 'todo'}  {run.run_id}")
    n_done = sum(d for _, d in status)
    print(f"{len(status)} runs: {n_done} done, {len(status) - n_done} to run -> {study.out}")


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="study YAML (experiments/studies/*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the YAML's out)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    parser.add_argument(
        "--methods", nargs="+", default=None,
        help="only these methods of the study (and the reference's): re-measure some rows",
    )  # fmt: skip
    args = parser.parse_args(argv)
    study = load_study(args.config, args.out)
    if args.methods:
        study = restrict_methods(study, args.methods)
    if args.dry_run:
        dry_run(study)
        return None
    study.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from data_modules.cache import shared_volume_cache  # heavy (MONAI), only when running

    with shared_volume_cache():
        runs.run_study(study)
    runs.say("bootstrap statistics and plots")
    table = write_outputs(study, runs.load_predictions(study), time.perf_counter() - t0)
    print((study.out / "results.md").read_text())
    runs.say(f"wrote {study.out / 'results.md'}, results.csv, roc_*.png, tsne.png")
    if args.wandb:
        from jepa_lightning.evaluation.wandb_results import log_results, results_view

        log_results(results_view(table), study.out, group=study.name, tags=[study.name])
    return table


if __name__ == "__main__":
    try:
        main()
    except (runs.StudyStateError, ValueError) as err:
        sys.exit(f"error: {err}")
