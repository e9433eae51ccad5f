"""Running a study's grid: run folders, ``done.json`` markers, CLI arguments, execution.

Every run goes through our CLI in this process (``jepa_lightning.main.main(argv)``): one
pretraining per method (``fit`` of its pretraining config), then per downstream run a
``fit`` of the DiagnosisTask config(s) and a ``predict`` of its best-validation checkpoint,
whose :class:`~jepa_lightning.callbacks.PredictionWriter` writes ``predictions.parquet``.
Everything downstream (tables, tests, plots) scores those saved predictions, so a table can
be remade from the folder without a model.

Why markers: a finished pretraining or run leaves ``done.json`` in its folder, written
atomically after everything else, so a folder without it is an interrupted run; it is
removed and run again, and a second invocation of the same study skips every finished run.
The marker keeps the run's arguments: if the study now asks for other ones, the runner
stops and says so rather than mixing two settings in one table. (It compares arguments,
not the contents of the config files they name: after editing a config, use a new ``out``.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from jepa_lightning.evaluation.study_spec import Run, Study

MARKER = "done.json"


class StudyStateError(RuntimeError):
    """The output folder holds runs made with other settings than the study asks for."""


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# --- folders and markers --------------------------------------------------------------------
def pretrain_folder(study: Study, method: str) -> Path:
    return (study.pretrain_root or study.out / "pretrain") / method


def run_folder(study: Study, run: Run) -> Path:
    return study.out / "runs" / run.run_id


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
        say(f"removing the interrupted run in {folder}")
        shutil.rmtree(folder)


# --- arguments ------------------------------------------------------------------------------
def _logger_override(configs: list[str], folder: Path) -> list[str]:
    """Point the config's logger (if any) at the run folder."""
    for config in reversed(configs):
        trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
        logger = trainer.get("logger")
        if isinstance(logger, dict) and "class_path" in logger:
            return [f"--trainer.logger.init_args.save_dir={folder}"]
    return []


def pretrain_argv(study: Study, method: str) -> list[str]:
    m = study.methods[method]
    folder = pretrain_folder(study, method)
    common = study.common_args if study.pretrain_common_args is None else study.pretrain_common_args
    return [
        "fit", "--config", m.pretrain, *common, *m.pretrain_args,
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


# --- execution ------------------------------------------------------------------------------
def _cli(argv: list[str]):
    from jepa_lightning.main import main as cli_main  # heavy import, only when running

    saved, sys.argv = sys.argv, sys.argv[:1]  # the study's own flags are not the run's
    try:
        return cli_main(argv)
    finally:
        sys.argv = saved


def ensure_pretrained(study: Study, method: str) -> str:
    """The method's pretraining checkpoint (``pretrain_checkpoint``: best by its config's
    monitor, else last; or always last), pretraining first unless a finished one is there.
    The marker also keeps where the run's metrics are and the encoder's width, for
    :func:`pretraining_health` when the study is scored later without the model."""
    folder = pretrain_folder(study, method)
    argv = pretrain_argv(study, method)
    marker = read_marker(folder)
    if marker is not None:
        check_same_args(folder, marker, argv)
        return marker["checkpoint"]
    fresh_folder(folder)
    say(f"pretraining {method}: {' '.join(argv)}")
    t0 = time.perf_counter()
    cli = _cli(argv)
    best = cli.trainer.checkpoint_callback.best_model_path
    last = str(folder / "checkpoints" / "last.ckpt")
    ckpt = best if best and study.methods[method].pretrain_checkpoint == "best" else last
    seconds = time.perf_counter() - t0
    log_dir = getattr(cli.trainer.logger, "log_dir", None)
    metrics = Path(log_dir) / "metrics.csv" if log_dir else None
    write_marker(
        folder,
        {
            "argv": argv,
            "checkpoint": ckpt,
            "seconds": round(seconds, 1),
            "metrics": str(metrics) if metrics is not None and metrics.exists() else None,
            "embed_dim": getattr(getattr(cli.model, "encoder", None), "embed_dim", None),
        },
    )
    say(f"pretrained {method} in {seconds:.0f} s -> {ckpt}")
    return ckpt


def execute_run(study: Study, run: Run, init_from: str | None) -> dict[str, Any]:
    """Fit, then predict with the best-validation checkpoint; mark the run done."""
    folder = run_folder(study, run)
    argv = run_argv(study, run, init_from)
    fresh_folder(folder)
    t0 = time.perf_counter()
    cli = _cli(argv)
    best = cli.trainer.checkpoint_callback.best_model_path
    cli.trainer.predict(
        cli.model, datamodule=cli.datamodule, ckpt_path=best or "last", return_predictions=False
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


def finished_init_from(study: Study, run: Run) -> str | None:
    """The checkpoint a finished run was initialised from: its pretraining's marker, or (when
    that folder was removed) what the run's own marker recorded."""
    if not study.protocols[run.protocol].pretrained:
        return None
    pretrained = read_marker(pretrain_folder(study, run.method))
    if pretrained is not None:
        return pretrained["checkpoint"]
    flag = "--model.init_args.init_from="
    recorded = read_marker(run_folder(study, run)) or {}
    return next((a[len(flag) :] for a in recorded.get("argv", []) if a.startswith(flag)), None)


def run_status(study: Study) -> list[tuple[Run, bool]]:
    return [(r, read_marker(run_folder(study, r)) is not None) for r in study.runs()]


def run_study(study: Study) -> list[Run]:
    """Run every unfinished run of the grid; returns those that were run now."""
    todo = [r for r, done in run_status(study) if not done]
    runs = study.runs()
    say(f"{study.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run")
    ran: list[Run] = []
    t_start = time.perf_counter()
    run_seconds = 0.0  # downstream runs only, so the estimate excludes pretraining
    for run in runs:
        folder = run_folder(study, run)
        p = study.protocols[run.protocol]
        marker = read_marker(folder)
        if marker is not None:  # finished: check its arguments, never pretrain for it
            check_same_args(folder, marker, run_argv(study, run, finished_init_from(study, run)))
            continue
        init_from = ensure_pretrained(study, run.method) if p.pretrained else None
        k = len(ran) + 1
        say(f"({k}/{len(todo)}) {run.run_id}: running")
        result = execute_run(study, run, init_from)
        ran.append(run)
        elapsed = time.perf_counter() - t_start
        run_seconds += result["seconds"]
        eta = run_seconds / k * (len(todo) - k)
        say(
            f"({k}/{len(todo)}) {run.run_id}: done in {result['seconds']:.0f} s "
            f"(elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)"
        )
    return ran


def load_predictions(study: Study) -> dict[Run, pd.DataFrame]:
    """Every run's saved predictions (what the tables and plots score)."""
    frames = {}
    for run, done in run_status(study):
        if not done:
            raise StudyStateError(f"run {run.run_id} is not finished; run the study first")
        frames[run] = pd.read_parquet(run_folder(study, run) / "predictions.parquet")
    return frames


def pretraining_health(study: Study, method: str) -> dict[str, Any] | None:
    """What a finished pretraining logged about collapse: the image-only validation RankMe,
    centred rank and spread share (min, best, last) and the encoder's width, the online
    image-only probe (min, best, last), and the offline references ``ref/*`` (random init,
    step 0) and ``final/*``. None when the pretraining left no metrics file (e.g. a W&B-only
    logger)."""
    marker = read_marker(pretrain_folder(study, method))
    if not marker or not marker.get("metrics") or not Path(marker["metrics"]).exists():
        return None
    m = pd.read_csv(marker["metrics"])
    health: dict[str, Any] = {
        "checkpoint": Path(marker["checkpoint"]).name,
        "embed_dim": marker.get("embed_dim"),
    }
    for key in ("rankme", "centred_rank", "spread_share", "probe"):
        column = f"val/{key}_auroc" if key == "probe" else f"val/{key}"
        values = m[column].dropna() if column in m else pd.Series(dtype=float)
        if len(values):
            health[f"{key}_min"] = float(values.min())
            health[f"{key}_best"] = float(values.max())
            health[f"{key}_last"] = float(values.iloc[-1])
    for column in m.columns:
        if column.startswith(("ref/", "final/")) and m[column].notna().any():
            health[column] = float(m[column].dropna().iloc[-1])
    return health
