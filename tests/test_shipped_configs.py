"""Every YAML shipped under ``experiments/`` goes through the CLI here (torchgeo smoke-runs
its ``tests/conf`` the same way): a training config fits one batch on the tiny cohort; a
study or synthetic-study YAML has each of its distinct run command lines resolved by the
CLI (``--print_config``), so a renamed option or a bad value in any of them fails here, not
an hour into a study. W&B sweeps and the W&B logging fragment are run by
``test_wandb_sweeps.py``; a new YAML that fits none of these groups fails
:func:`test_every_shipped_yaml_is_covered`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_modules.synthetic import CohortSpec
from jepa_lightning.evaluation.study_spec import load_study
from jepa_lightning.evaluation.synthetic_study import load_synthetic_study
from jepa_lightning.main import main
from tests.conftest import TINY, tiny_data_args
from tests.helpers import QUIET, ROOT

EXPERIMENTS = ROOT / "experiments"
TRAINING = sorted(
    [
        *EXPERIMENTS.glob("methods/*.yaml"),
        *EXPERIMENTS.glob("quickstart/*.yaml"),
        *EXPERIMENTS.glob("longitudinal/pretrain*.yaml"),
    ]
)
STUDIES = sorted(EXPERIMENTS.glob("studies/*.yaml"))
STUDY_GRIDS = sorted(
    [*EXPERIMENTS.glob("synthetic_study/grid*.yaml"), *EXPERIMENTS.glob("longitudinal/grid*.yaml")]
)
SYNTHETIC = sorted(
    p
    for folder in ("synthetic_study", "longitudinal")
    for p in EXPERIMENTS.glob(f"{folder}/*.yaml")
    if not p.name.startswith(("grid", "pretrain"))
)
SCENARIOS = sorted(EXPERIMENTS.glob("synthetic_study/scenarios/*.yaml"))
ELSEWHERE = {  # run by their own tests
    *EXPERIMENTS.glob("sweeps/*.yaml"),  # test_wandb_sweeps: every sweep's command
    EXPERIMENTS / "logging" / "wandb.yaml",  # test_wandb_sweeps: offline W&B runs
    EXPERIMENTS / "findings" / "findings.yaml",  # test_findings: the README's table from it
}
LIDC_DATA = EXPERIMENTS / "lidc" / "data.yaml"  # resolved through studies/lidc.yaml

SMALL = ["--model.init_args.backbone.embed_dim=32", "--model.init_args.backbone.depth=1",
         "--model.init_args.backbone.num_heads=2"]  # fmt: skip


def _name(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


def test_every_shipped_yaml_is_covered():
    covered = {*TRAINING, *STUDIES, *STUDY_GRIDS, *SYNTHETIC, *SCENARIOS, *ELSEWHERE, LIDC_DATA}
    shipped = set(EXPERIMENTS.rglob("*.yaml"))
    assert shipped - covered == set(), "give these YAMLs a smoke test"
    lidc_study = (EXPERIMENTS / "studies" / "lidc.yaml").read_text()
    assert "experiments/lidc/data.yaml" in lidc_study


@pytest.fixture(scope="module")
def small_checkpoint(tiny_cohort, tmp_path_factory) -> Path:
    """One JEPA step with the small backbone: what the finetuning configs initialise from."""
    run = tmp_path_factory.mktemp("init")
    main(["fit", "--config", str(EXPERIMENTS / "methods" / "jepa.yaml"), *tiny_data_args(tiny_cohort),
          *SMALL, *QUIET, f"--trainer.default_root_dir={run}",
          f"--trainer.logger.init_args.save_dir={run}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0"])  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


# A longitudinal config's cohort-over-time knobs, set back to the tiny cohort's (one scan per
# patient) so its cohort folder is reused; its sequence batches are then one real scan each.
OVER_TIME = ("scans_per_patient", "scan_interval_days", "growth_signal")


def _tiny_cohort_over_time(data_args: dict) -> list[str]:
    spec = CohortSpec(**TINY).to_json()  # tuples as lists
    return [f"--data.init_args.{k}={json.dumps(spec[k])}" for k in OVER_TIME if k in data_args]


@pytest.mark.parametrize("config", TRAINING, ids=_name)
def test_training_config_fits_one_batch(config, tiny_cohort, small_checkpoint, tmp_path):
    shipped = yaml.safe_load(config.read_text())
    model_args = shipped["model"].get("init_args", {})
    init = [f"--model.init_args.init_from={small_checkpoint}"] if "init_from" in model_args else []
    over_time = _tiny_cohort_over_time(shipped["data"].get("init_args", {}))
    cli = main(["fit", "--config", str(config), *tiny_data_args(tiny_cohort), *over_time, *SMALL,
                *QUIET, *init, f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.fast_dev_run=true"])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert "train/loss" in cli.trainer.callback_metrics


def _resolves(argv: list[str]) -> None:
    """The CLI parses and type-checks ``argv`` (every class, every value) and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code == 0, argv


def _distinct_command_lines(study) -> list[list[str]]:
    """One command line per pretraining and per (method, protocol): the runs of a pair
    differ only in label fraction, subset, seed and folders."""
    from jepa_lightning.evaluation import runs

    lines = [runs.pretrain_argv(study, m.name) for m in study.methods.values() if m.pretrain]
    seen = set()
    for run in study.runs():
        if (run.method, run.protocol) not in seen:
            seen.add((run.method, run.protocol))
            lines.append(runs.run_argv(study, run, init_from="pretrained.ckpt"))
    return lines


@pytest.mark.parametrize("path", [*STUDIES, *STUDY_GRIDS], ids=_name)
def test_study_command_lines_resolve(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # study YAMLs name configs relative to the repository
    study = load_study(path, out=str(tmp_path))
    for argv in _distinct_command_lines(study):
        _resolves(argv)
    capsys.readouterr()


@pytest.mark.parametrize("path", SYNTHETIC, ids=_name)
def test_synthetic_study_command_lines_resolve(path, tmp_path, monkeypatch, capsys):
    """Every scenario's data settings on the grid's first command line, and the whole grid
    on the first scenario."""
    monkeypatch.chdir(ROOT)
    spec = load_synthetic_study(path)
    spec.out = tmp_path
    for i, scenario in enumerate(spec.unique_scenarios()):
        lines = _distinct_command_lines(spec.scenario_study(scenario))
        for argv in lines if i == 0 else lines[-1:]:
            _resolves(argv)
    capsys.readouterr()


@pytest.mark.parametrize("path", SCENARIOS, ids=_name)
def test_scenario_fragment_resolves_on_the_quickstart_pretraining(path, capsys):
    _resolves(["fit", "--config", str(EXPERIMENTS / "quickstart" / "pretrain.yaml"),
               "--config", str(path)])  # fmt: skip
    capsys.readouterr()
