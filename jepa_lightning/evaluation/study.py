"""Run a study grid (method x protocol x label fraction x subset) and write its table and plots.

``python -m jepa_lightning.evaluation.study --config experiments/studies/quick.yaml``
(``make study-quick``); ``--dry-run`` lists the runs and whether each is done.

Every run goes through our CLI in this process (``jepa_lightning.main.main(argv)``): one
pretraining per method (``fit`` of its pretraining config), then per downstream run a
``fit`` of the DiagnosisTask config(s) and a ``predict`` of its best-validation checkpoint,
whose :class:`~jepa_lightning.callbacks.PredictionWriter` writes ``predictions.parquet``.

Resuming: a finished pretraining or run leaves ``done.json`` in its folder, written
atomically after everything else, so a folder without it is an interrupted run; it is
removed and run again. A second invocation with the same study skips every finished run.
If a finished run was made with other arguments than the study now asks for, the runner
stops and says so (point ``out`` at a new folder or delete that run).

Outputs in ``out``: ``results.csv`` and ``results.md`` (per method, protocol, label
fraction and cohort: AUROC/AUPRC mean ± sd over subsets, patient-level bootstrap 95 % CI of
that mean, paired bootstrap p-value against the study's reference model),
``roc_<cohort>.png`` and ``tsne.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from jepa_lightning.evaluation import stats
from jepa_lightning.evaluation.plots import roc_figure, tsne_figure
from jepa_lightning.evaluation.study_spec import Run, Study, load_study
from jepa_lightning.evaluation.tables import markdown_table

log = logging.getLogger(__name__)

MARKER = "done.json"
METRIC_NAMES = ("auroc", "auprc")


class StudyStateError(RuntimeError):
    """The output folder holds runs made with other settings than the study asks for."""


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# --- markers --------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def write_marker(folder: Path, content: dict[str, Any]) -> None:
    """Write ``done.json`` atomically (temp file + rename): present means finished."""
    tmp = folder / f".{MARKER}.partial"
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, folder / MARKER)


def check_same_args(folder: Path, marker: dict[str, Any], argv: list[str]) -> None:
    if marker.get("argv") != argv:
        raise StudyStateError(
            f"{folder} was finished with other arguments than this study now asks for "
            f"(then: {marker.get('argv')}, now: {argv}); point out at a new folder or delete "
            f"{folder} to run it again"
        )


def fresh_folder(folder: Path) -> None:
    """An interrupted run's folder (no marker) is the runner's own output: start it over."""
    if folder.exists():
        _say(f"removing the interrupted run in {folder}")
        shutil.rmtree(folder)


# --- argv -----------------------------------------------------------------------------------
def _logger_override(configs: list[str], folder: Path) -> list[str]:
    """Point the config's logger (if any) at the run folder."""
    for config in reversed(configs):
        trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
        logger = trainer.get("logger")
        if isinstance(logger, dict) and "class_path" in logger:
            return [f"--trainer.logger.init_args.save_dir={folder}"]
    return []


def pretrain_folder(study: Study, method: str) -> Path:
    return study.out / "pretrain" / method


def run_folder(study: Study, run: Run) -> Path:
    return study.out / "runs" / run.run_id


def pretrain_argv(study: Study, method: str) -> list[str]:
    m = study.methods[method]
    folder = pretrain_folder(study, method)
    return [
        "fit", "--config", m.pretrain, *study.common_args, *m.pretrain_args,
        f"--trainer.default_root_dir={folder}", *_logger_override([m.pretrain], folder),
    ]  # fmt: skip


def run_argv(study: Study, run: Run, init_from: str | None) -> list[str]:
    m, p = study.methods[run.method], study.protocols[run.protocol]
    folder = run_folder(study, run)
    configs = [*m.configs, *p.configs]
    argv = ["fit"]
    for c in configs:
        argv += ["--config", c]
    argv += [
        *study.common_args, *m.args, *p.args,
        f"--data.init_args.label_fraction={run.label_fraction}",
        f"--data.init_args.label_subset_seed={run.subset}",
        f"--seed_everything={run.subset}",
        f"--trainer.default_root_dir={folder}", *_logger_override(configs, folder),
        f"--predictions.output={folder / 'predictions.parquet'}",
    ]  # fmt: skip
    if p.pretrained:
        argv.append(f"--model.init_args.init_from={init_from}")
    return argv


# --- running --------------------------------------------------------------------------------
def _cli(argv: list[str]):
    from jepa_lightning.main import main as cli_main  # heavy import, only when running

    saved, sys.argv = sys.argv, sys.argv[:1]  # the study's own flags are not the run's
    try:
        return cli_main(argv)
    finally:
        sys.argv = saved


def ensure_pretrained(study: Study, method: str) -> str:
    """The method's pretraining checkpoint (best by its config's monitor, else last),
    pretraining first unless a finished one is there."""
    folder = pretrain_folder(study, method)
    argv = pretrain_argv(study, method)
    marker = read_marker(folder)
    if marker is not None:
        check_same_args(folder, marker, argv)
        return marker["checkpoint"]
    fresh_folder(folder)
    _say(f"pretraining {method}: {' '.join(argv)}")
    t0 = time.perf_counter()
    cli = _cli(argv)
    best = cli.trainer.checkpoint_callback.best_model_path
    ckpt = best or str(folder / "checkpoints" / "last.ckpt")
    seconds = time.perf_counter() - t0
    write_marker(folder, {"argv": argv, "checkpoint": ckpt, "seconds": round(seconds, 1)})
    _say(f"pretrained {method} in {seconds:.0f} s -> {ckpt}")
    return ckpt


def execute_run(study: Study, run: Run, init_from: str | None) -> dict[str, Any]:
    """Fit, then predict with the best-validation checkpoint; mark the run done."""
    folder = run_folder(study, run)
    argv = run_argv(study, run, init_from)
    fresh_folder(folder)
    t0 = time.perf_counter()
    cli = _cli(argv)
    best = cli.trainer.checkpoint_callback.best_model_path
    ckpt = best or "last"
    cli.trainer.predict(
        cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, return_predictions=False
    )
    predictions = folder / "predictions.parquet"
    if not predictions.exists():
        raise RuntimeError(f"run {run.run_id} finished but wrote no {predictions}")
    seconds = time.perf_counter() - t0
    marker = {
        "argv": argv,
        "checkpoint": best or str(folder / "checkpoints" / "last.ckpt"),
        "predictions": str(predictions),
        "seconds": round(seconds, 1),
    }
    write_marker(folder, marker)
    return marker


def run_status(study: Study) -> list[tuple[Run, bool]]:
    return [(r, read_marker(run_folder(study, r)) is not None) for r in study.runs()]


def run_study(study: Study) -> list[Run]:
    """Run every unfinished run of the grid; returns those that were run now."""
    todo = [r for r, done in run_status(study) if not done]
    runs = study.runs()
    _say(
        f"{study.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run"
    )
    ran: list[Run] = []
    t_start = time.perf_counter()
    run_seconds = 0.0  # downstream runs only, so the estimate excludes pretraining
    for run in runs:
        folder = run_folder(study, run)
        p = study.protocols[run.protocol]
        init_from = ensure_pretrained(study, run.method) if p.pretrained else None
        marker = read_marker(folder)
        if marker is not None:
            check_same_args(folder, marker, run_argv(study, run, init_from))
            continue
        k = len(ran) + 1
        _say(f"({k}/{len(todo)}) {run.run_id}: running")
        result = execute_run(study, run, init_from)
        ran.append(run)
        elapsed = time.perf_counter() - t_start
        run_seconds += result["seconds"]
        eta = run_seconds / k * (len(todo) - k)
        _say(
            f"({k}/{len(todo)}) {run.run_id}: done in {result['seconds']:.0f} s "
            f"(elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)"
        )
    return ran


# --- results --------------------------------------------------------------------------------
def load_predictions(study: Study) -> dict[Run, pd.DataFrame]:
    frames = {}
    for run, done in run_status(study):
        if not done:
            raise StudyStateError(f"run {run.run_id} is not finished; run the study first")
        frames[run] = pd.read_parquet(run_folder(study, run) / "predictions.parquet")
    return frames


def model_name(method: str, protocol: str) -> str:
    return f"{method} / {protocol}"


def summarise(study: Study, frames: dict[Run, pd.DataFrame]) -> pd.DataFrame:
    """The results table: one row per (method, protocol, label fraction, cohort)."""
    cohorts = sorted({c for f in frames.values() for c in f["cohort"].unique()})
    models = [(m.name, p) for m in study.methods.values() for p in m.protocols]
    rows = []
    for fraction in study.label_fractions:
        for cohort in cohorts:
            cols: dict[str, pd.DataFrame] = {}
            for method, protocol in models:
                for s in study.subsets:
                    f = frames[Run(method, protocol, fraction, s)]
                    cols[f"{method}|{protocol}|{s}"] = f[f["cohort"] == cohort]
            table = stats.align(cols)
            table = table[table["label"].notna()]
            label = table["label"].to_numpy().astype(int)
            warning = stats.one_class_warning(
                f"study cohort {cohort!r} (label fraction {fraction:g})", label
            )
            if warning:
                log.warning("%s", warning)
            resamples = stats.patient_bootstrap(
                table["patient_id"], study.n_resamples, study.bootstrap_seed
            )
            names = list(cols)
            dists = {
                n: stats.bootstrap_distribution(n, table[names].to_numpy(), label, resamples)
                for n in METRIC_NAMES
            }

            def subset_cols(method: str, protocol: str, names=names) -> list[int]:
                return [names.index(f"{method}|{protocol}|{s}") for s in study.subsets]

            for method, protocol in models:
                idx = subset_cols(method, protocol)
                row: dict[str, Any] = {
                    "method": method,
                    "protocol": protocol,
                    "label_pct": 100 * fraction,
                    "cohort": cohort,
                    "n_scans": len(table),
                    "n_positive": int(label.sum()),
                    "n_patients": table["patient_id"].nunique(),
                    "n_subsets": len(idx),
                }
                for n in METRIC_NAMES:
                    points = np.array(
                        [stats.metric(n, table[names[i]].to_numpy(), label) for i in idx]
                    )
                    boot = dists[n][:, idx].mean(1)
                    low, high = stats.percentile_ci(boot, study.level)
                    row[f"{n}_mean"] = float(np.mean(points))
                    row[f"{n}_sd"] = float(np.std(points, ddof=1)) if len(points) > 1 else np.nan
                    row[f"{n}_ci_low"], row[f"{n}_ci_high"] = low, high
                    p_value = np.nan
                    if study.reference and (method, protocol) != study.reference:
                        ref = dists[n][:, subset_cols(*study.reference)].mean(1)
                        p_value = stats.paired_p_value(boot - ref)
                    row[f"{n}_p_vs_ref"] = p_value
                row["n_valid_resamples"] = int(np.isfinite(dists["auroc"][:, idx[0]]).sum())
                rows.append(row)
    return pd.DataFrame(rows)


def compare_models(
    study: Study,
    frames: dict[Run, pd.DataFrame],
    model: tuple[str, str],
    reference: tuple[str, str],
    cohort: str,
    fraction: float,
    name: str = "auroc",
) -> dict[str, float]:
    """Metric ``name`` of ``model`` minus ``reference`` (each averaged over the grid's
    subsets) on the same scans of ``cohort``, with its patient-level bootstrap CI and
    paired p-value."""
    cols: dict[str, pd.DataFrame] = {}
    for tag, (m, p) in (("model", model), ("ref", reference)):
        for s in study.subsets:
            f = frames[Run(m, p, fraction, s)]
            cols[f"{tag}|{s}"] = f[f["cohort"] == cohort]
    table = stats.align(cols)
    table = table[table["label"].notna()]
    label = table["label"].to_numpy().astype(int)
    names = list(cols)
    probs = table[names].to_numpy()
    resamples = stats.patient_bootstrap(
        table["patient_id"], study.n_resamples, study.bootstrap_seed
    )
    dist = stats.bootstrap_distribution(name, probs, label, resamples)
    is_model = np.array([n.startswith("model|") for n in names])
    delta_dist = dist[:, is_model].mean(1) - dist[:, ~is_model].mean(1)
    points = np.array([stats.metric(name, probs[:, i], label) for i in range(len(names))])
    low, high = stats.percentile_ci(delta_dist, study.level)
    return {
        "delta": float(points[is_model].mean() - points[~is_model].mean()),
        "delta_low": low,
        "delta_high": high,
        "p_value": stats.paired_p_value(delta_dist),
    }


def verdict(low: float, high: float) -> str:
    """``helped`` / ``hurt`` when the CI of the difference excludes 0, else ``tied``."""
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "tied"


def comparisons_table(study: Study, frames: dict[Run, pd.DataFrame]) -> pd.DataFrame:
    """The study's ``comparisons``: per pair, label fraction, cohort and metric, the
    difference with its patient-level bootstrap CI, paired p-value and verdict."""
    cohorts = sorted({c for f in frames.values() for c in f["cohort"].unique()})
    rows = []
    for model, against in study.comparisons:
        for fraction in study.label_fractions:
            for cohort in cohorts:
                for n in METRIC_NAMES:
                    c = compare_models(study, frames, model, against, cohort, fraction, n)
                    rows.append(
                        {
                            "model": model_name(*model),
                            "against": model_name(*against),
                            "label_pct": 100 * fraction,
                            "cohort": cohort,
                            "metric": n,
                            **c,
                            "verdict": verdict(c["delta_low"], c["delta_high"]),
                        }
                    )
    return pd.DataFrame(rows)


def comparisons_markdown(study: Study, table: pd.DataFrame) -> str:
    rows = [
        {
            "model": r.model,
            "against": r.against,
            "labels": f"{r.label_pct:g} %",
            "cohort": r.cohort,
            "metric": r.metric.upper(),
            "Δ": f"{r.delta:+.3f}",
            f"Δ {study.level:.0%} CI": f"[{r.delta_low:+.3f}, {r.delta_high:+.3f}]",
            "p": _p(r.p_value),
            "verdict": r.verdict,
        }
        for r in table.itertuples(index=False)
    ]
    return markdown_table(pd.DataFrame(rows))


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f}" + ("" if np.isnan(sd) else f" ± {sd:.3f}")


def _p(p: float) -> str:
    if np.isnan(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paper_table(study: Study, table: pd.DataFrame) -> pd.DataFrame:
    """The table as the papers print it: formatted mean ± sd, CI and p-value columns."""
    level = f"{study.level:.0%}"
    out = []
    for r in table.itertuples(index=False):
        is_ref = study.reference is not None and (r.method, r.protocol) == study.reference
        row = {
            "method": r.method,
            "protocol": r.protocol,
            "labels": f"{r.label_pct:g} %",
            "cohort": r.cohort,
            "n scans": r.n_scans,
        }
        for n, title in (("auroc", "AUROC"), ("auprc", "AUPRC")):
            row[f"{title} (mean ± sd)"] = _fmt(getattr(r, f"{n}_mean"), getattr(r, f"{n}_sd"))
            row[f"{title} {level} CI"] = (
                f"[{getattr(r, f'{n}_ci_low'):.3f}, {getattr(r, f'{n}_ci_high'):.3f}]"
            )
            if study.reference is not None:
                row[f"p {title}"] = "ref" if is_ref else _p(getattr(r, f"{n}_p_vs_ref"))
        out.append(row)
    return pd.DataFrame(out)


def _in_cohort(frame: pd.DataFrame, cohort: str) -> pd.DataFrame:
    return frame[frame["cohort"] == cohort]


def write_outputs(
    study: Study, frames: dict[Run, pd.DataFrame], wall_s: float | None
) -> pd.DataFrame:
    table = summarise(study, frames)
    table.to_csv(study.out / "results.csv", index=False)
    cohorts = sorted(table["cohort"].unique())
    models = [(m.name, p) for m in study.methods.values() for p in m.protocols]
    figures = []
    for cohort in cohorts:
        curves = {
            f: {
                model_name(m, p): [
                    _in_cohort(frames[Run(m, p, f, s)], cohort) for s in study.subsets
                ]
                for m, p in models
            }
            for f in study.label_fractions
        }
        aurocs = {
            (r.label_pct / 100, model_name(r.method, r.protocol)): (r.auroc_mean, r.auroc_sd)
            for r in table[table["cohort"] == cohort].itertuples()
        }
        figures.append(roc_figure(curves, cohort, study.out / f"roc_{cohort}.png", aurocs))
    fraction = study.tsne_fraction or max(study.label_fractions)
    subset = study.subsets[0]
    tsne = tsne_figure(
        {model_name(m, p): frames[Run(m, p, fraction, subset)] for m, p in models},
        study.out / "tsne.png",
        f"t-SNE of backbone embeddings of the predicted scans ({fraction:.0%} labels, subset {subset})",
        seed=study.bootstrap_seed,
    )
    figures.append(tsne)
    ref = f"{study.reference[0]} / {study.reference[1]}" if study.reference else "none"
    lines = [
        f"# Study {study.name}",
        "",
        f"Config: `{study.source}`. Label fractions of the labelled training patients: "
        f"{[f'{100 * f:g} %' for f in study.label_fractions]}; subsets (label subset and seed): "
        f"{study.subsets}. Metrics on the predicted (test) scans of each cohort: mean ± sd over "
        f"subsets; {study.level:.0%} CI: patient-level bootstrap ({study.n_resamples} resamples, "
        f"seed {study.bootstrap_seed}) of the subset mean; p: two-sided paired bootstrap test "
        f"against the reference **{ref}** at the same label fraction, on the same resamples.",
        "",
        markdown_table(paper_table(study, table)),
        "",
        *[f"![{p.stem}]({p.name})" for p in figures],
    ]
    if study.comparisons:
        pairs = comparisons_table(study, frames)
        pairs.to_csv(study.out / "comparisons.csv", index=False)
        lines += [
            "",
            "## Comparisons",
            "",
            "Δ = model − against (each the mean over subsets) on the same scans, with its "
            "patient-level bootstrap CI and two-sided paired p-value; *helped* / *hurt* when "
            "the CI excludes 0, *tied* otherwise.",
            "",
            comparisons_markdown(study, pairs),
        ]
    if wall_s is not None:
        lines += ["", f"Wall time of the runs of this invocation: {wall_s / 60:.1f} min."]
    (study.out / "results.md").write_text("\n".join(lines) + "\n")
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="study YAML (experiments/studies/*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the YAML's out)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    args = parser.parse_args(argv)
    study = load_study(args.config, args.out)
    if args.dry_run:
        status = run_status(study)
        for method in study.methods.values():
            if method.pretrain:
                done = read_marker(pretrain_folder(study, method.name)) is not None
                print(f"{'done' if done else 'todo'}  pretrain {method.name}: {method.pretrain}")
        for run, done in status:
            print(f"{'done' if done else 'todo'}  {run.run_id}")
        n_done = sum(d for _, d in status)
        print(f"{len(status)} runs: {n_done} done, {len(status) - n_done} to run -> {study.out}")
        return None
    study.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from data_modules.cache import shared_volume_cache  # heavy (MONAI), only when running

    with shared_volume_cache():
        run_study(study)
    _say("bootstrap statistics and plots")
    table = write_outputs(study, load_predictions(study), time.perf_counter() - t0)
    print((study.out / "results.md").read_text())
    _say(f"wrote {study.out / 'results.md'}, results.csv, roc_*.png, tsne.png")
    return table


if __name__ == "__main__":
    try:
        main()
    except (StudyStateError, ValueError) as err:
        sys.exit(f"error: {err}")
