"""W&B: the logger config (offline without a key), config logged into the run, and every sweep
file's command rendered the way the W&B agent renders it, then parsed by the real CLI."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils

from jepa_lightning.loggers import WandbLogger, wandb_should_be_offline
from jepa_lightning.main import main
from tests.conftest import tiny_data_args
from tests.helpers import QUICKSTART_PRETRAIN as PRETRAIN
from tests.helpers import ROOT

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
WANDB = str(ROOT / "experiments" / "logging" / "wandb.yaml")


def sample(spec: dict, rng: random.Random):
    """One value of a W&B sweep parameter, as the sweep controller would draw it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    dist = spec.get("distribution", "uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    raise AssertionError(f"sampler for {dist} missing in this test")


def render(sweep: dict, params: dict) -> list[str]:
    """The agent's rendering (wandb.wandb_agent.Agent._command_run): macros replaced by
    wandb's own create_sweep_command / create_sweep_command_args."""
    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    macros = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    macros.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    out: list[str] = []
    for chunk in map(str, command):
        out += macros.get(chunk[2:-1], []) if chunk.startswith("${") else [chunk]
    return out


def dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_command_parses_with_sampled_parameters(sweep_file, capsys, monkeypatch):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["metric"]["name"].startswith("val/")
    assert "${args}" in sweep["command"]
    monkeypatch.chdir(ROOT)  # the agent runs the command from the repository root
    rng = random.Random(sweep_file.stem)
    for _ in range(3):
        params = {k: sample(v, rng) for k, v in sweep["parameters"].items()}
        argv = render(sweep, params)
        assert argv[:5] == ["/usr/bin/env", "python", "-m", "jepa_lightning", "fit"]
        assert all(f"--{k}=" in " ".join(argv) for k in params)
        with pytest.raises(SystemExit) as exit_:
            main(argv[4:] + ["--print_config"])
        assert exit_.value.code == 0, capsys.readouterr().err
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, value in params.items():
            got = dotted(printed, key)
            if isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-6), key
            else:
                assert got == value, key
        assert printed["trainer"]["logger"]["class_path"].endswith("loggers.WandbLogger")


def test_offline_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert wandb_should_be_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_should_be_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_should_be_offline()


def test_wandb_logger_run_logs_the_resolved_config(tiny_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = main(["fit", "--config", PRETRAIN, "--config", WANDB, *tiny_data_args(tiny_cohort),
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}",
                "--trainer.logger.init_args.tags=[test,ci]", "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0", "--model.init_args.backbone.depth=1",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    logger = cli.trainer.logger
    assert isinstance(logger, WandbLogger)
    run = logger.experiment
    assert run.settings._offline and run.project == "jepa-lightning"
    assert list(run.tags) == ["test", "ci"]
    assert run.config["model"]["class_path"].endswith("MultimodalJEPA")
    assert run.config["data"]["init_args"]["batch_size"] == 8
    run.finish()
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*"))


def test_results_table_and_plot_logged_to_wandb(tmp_path, monkeypatch):
    import json

    import pandas as pd

    from jepa_lightning.evaluation.wandb_results import log_results

    monkeypatch.setenv("WANDB_MODE", "offline")
    table = pd.DataFrame(
        {"method": ["JEPA-pretrained", "JEPA-pretrained", "scratch", "scratch"],
         "cohort": ["external", "internal"] * 2, "n_scans": [200, 72, 200, 72],
         "AUROC": [0.77, 0.78, 0.76, 0.79], "AUROC_sd": [0.01, 0.02, 0.01, 0.03]}
    )  # fmt: skip
    run_dir = Path(log_results(table, tmp_path, tags=["test"]))
    assert (tmp_path / "results_auroc.png").stat().st_size > 0
    (table_file,) = run_dir.glob("media/table/results/table_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"] == list(table.columns) and len(logged["data"]) == 4
    assert list(run_dir.glob("media/images/results/auroc_*.png"))
