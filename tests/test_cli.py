"""The real CLI, driven through ``main([...])`` on a tiny generated cohort."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from jepa_lightning.main import main
from jepa_lightning.tasks import momentum as momentum_module
from jepa_lightning.tasks.base import BaseTask
from jepa_lightning.tasks.diagnosis import CheckpointMismatchError
from tests.conftest import tiny_data_args
from tests.helpers import QUIET

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "quickstart"
PRETRAIN, FINETUNE = str(CONFIGS / "pretrain.yaml"), str(CONFIGS / "finetune.yaml")


def _fit(config: str, run_dir: Path, cohort: Path, *extra: str):
    return main(
        [
            "fit", "--config", config,
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            *tiny_data_args(cohort), *QUIET, *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tiny_cohort, tmp_path_factory) -> Path:
    """A JEPA checkpoint from two short epochs on the tiny cohort."""
    run = tmp_path_factory.mktemp("pretrain")
    cli = _fit(PRETRAIN, run, tiny_cohort, "--trainer.max_epochs=2",
               "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1")  # fmt: skip
    metrics = cli.trainer.callback_metrics
    for key in (
        "train/loss",
        "train/loss_image",
        "train/loss_ehr",
        "val/loss",
        "val/rankme",
        "val/centred_rank",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    return run


def test_help_and_version(capsys):
    for argv in (["--help"], ["fit", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    assert "jepa-lightning" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config, model", [(PRETRAIN, "MultimodalJEPA"), (FINETUNE, "DiagnosisTask")]
)
def test_print_config_resolves_short_names(config, model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith(model)
    assert printed["data"]["class_path"].endswith("SyntheticCohortDataModule")
    assert printed["checkpoint"]["save_last"] is True
    assert printed["seed_everything"] == 0


def test_bad_config_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", PRETRAIN, "--model.init_args.embed_dimm=3", "--print_config"])
    assert exit_.value.code != 0
    assert "embed_dimm" in capsys.readouterr().err


def test_fast_dev_run_pretrain(tiny_cohort, tmp_path):
    cli = _fit(PRETRAIN, tmp_path, tiny_cohort, "--trainer.fast_dev_run=true")
    assert cli.trainer.global_step == 1
    # linked from the data module: the model was sized by the data, not by hand
    assert cli.model.hparams.n_ehr_features == 12 and cli.model.hparams.image_size == [32, 32, 32]


def test_pretrain_saves_config_and_last_checkpoint(pretrained):
    assert (pretrained / "checkpoints" / "last.ckpt").exists()
    (config,) = pretrained.glob("logs/version_*/config.yaml")
    assert yaml.safe_load(config.read_text())["model"]["class_path"].endswith("MultimodalJEPA")
    ckpt = torch.load(
        pretrained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    stats = next(v for v in ckpt.values() if isinstance(v, dict) and "ehr_stats" in v)["ehr_stats"]
    assert len(stats["mean"]) == 12  # EHR normalisation travels with the checkpoint


def test_finetune_from_jepa_loads_the_target_encoder_and_tests_per_cohort(
    pretrained, tiny_cohort, tmp_path
):
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    cli = _fit(
        FINETUNE,
        tmp_path,
        tiny_cohort,
        "--trainer.max_epochs=1",
        f"--model.init_args.init_from={ckpt}",
    )
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # The finetuned encoder started from the EMA target: a weight the head never touches
    # (frozen pos-embed is a buffer; use the EHR missing embedding, trained only by JEPA)
    # must differ from a fresh model's and equal the target encoder's before finetuning.
    fresh = _fit(FINETUNE, tmp_path / "fresh", tiny_cohort, "--trainer.fast_dev_run=true")
    assert not torch.equal(
        fresh.model.encoder.ehr.missing_embed, sd["target_encoder.ehr.missing_embed"]
    )
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    for cohort in ("internal", "external"):
        assert 0.0 <= metrics[f"test/{cohort}/auroc"] <= 1.0
        assert metrics[f"test/{cohort}/n_scans"] > 0
    n_test = int((cli.datamodule.split_table["split"] == "test").sum())
    assert metrics["test/internal/n_scans"] + metrics["test/external/n_scans"] == n_test
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    probs = torch.cat([p["prob"] for p in predictions])
    assert len(probs) == n_test and ((probs >= 0) & (probs <= 1)).all()
    assert sum(len(p["scan_id"]) for p in predictions) == n_test


def test_init_from_loads_weights_exactly(pretrained, tiny_cohort, tmp_path):
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    cli = main(
        ["fit", "--config", FINETUNE, f"--model.init_args.init_from={ckpt}", "--print_config"][:-1]
        + [*tiny_data_args(tiny_cohort), *QUIET, "--trainer.max_epochs=0", f"--trainer.default_root_dir={tmp_path}",
           f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )  # fmt: skip
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in cli.model.encoder.state_dict().items():
        assert torch.equal(value, sd[f"target_encoder.{name}"]), name


def test_init_from_mismatched_backbone_fails_loudly(pretrained, tiny_cohort, tmp_path):
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    with pytest.raises(
        CheckpointMismatchError, match=r"embed_dim.*--model.init_args.backbone.embed_dim=96"
    ):
        _fit(FINETUNE, tmp_path, tiny_cohort, f"--model.init_args.init_from={ckpt}",
             "--model.init_args.backbone.embed_dim=48", "--trainer.fast_dev_run=true")  # fmt: skip


def test_init_from_missing_or_foreign_checkpoint(tiny_cohort, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _fit(
            FINETUNE, tmp_path, tiny_cohort, f"--model.init_args.init_from={tmp_path / 'nope.ckpt'}"
        )
    hparams = {"image_size": [32, 32, 32], "patch_size": 8, "n_ehr_features": 12, "embed_dim": 96,
               "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}  # fmt: skip
    unchecked = tmp_path / "unchecked.ckpt"
    torch.save({"state_dict": {"encoder.norm.weight": torch.zeros(96)}}, unchecked)
    with pytest.raises(
        CheckpointMismatchError, match="does not record the backbone hyperparameters"
    ):
        _fit(FINETUNE, tmp_path, tiny_cohort, f"--model.init_args.init_from={unchecked}")
    foreign = tmp_path / "foreign.ckpt"
    state = {"resnet.conv1.weight": torch.zeros(1)}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, foreign)
    with pytest.raises(CheckpointMismatchError, match="no encoder weights.*resnet"):
        _fit(FINETUNE, tmp_path, tiny_cohort, f"--model.init_args.init_from={foreign}")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((tiny_cohort / "manifest.parquet").read_bytes()[:100])
    with pytest.raises(CheckpointMismatchError, match="could not be loaded"):
        _fit(FINETUNE, tmp_path, tiny_cohort, f"--model.init_args.init_from={truncated}")


def test_linear_probe_keeps_backbone_frozen(pretrained, tiny_cohort, tmp_path):
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    cli = _fit(FINETUNE, tmp_path, tiny_cohort, "--trainer.max_epochs=1", f"--model.init_args.init_from={ckpt}",
               "--model.init_args.freeze_backbone=true")  # fmt: skip
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in cli.model.encoder.state_dict().items():
        assert torch.equal(value, sd[f"target_encoder.{name}"]), name
    assert not cli.model.encoder.training


@pytest.mark.parametrize("modalities", ["image", "ehr"])
def test_single_modality_finetune(tiny_cohort, tmp_path, modalities):
    cli = _fit(FINETUNE, tmp_path, tiny_cohort, "--trainer.fast_dev_run=true",
               f"--model.init_args.modalities={modalities}")  # fmt: skip
    assert cli.trainer.global_step == 1


def test_ema_updates_once_per_optimizer_step_with_accumulation(tiny_cohort, tmp_path, monkeypatch):
    calls = []
    real = momentum_module.ema_update_
    monkeypatch.setattr(
        momentum_module, "ema_update_", lambda t, o, m: (calls.append(m), real(t, o, m))
    )
    cli = _fit(PRETRAIN, tmp_path, tiny_cohort, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
               "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0")  # fmt: skip
    assert cli.trainer.global_step == 2
    assert len(calls) == 2
    assert calls[0] < calls[1] <= 1.0  # momentum schedule rises with the optimizer step


def test_resume_from_last_continues_the_same_run(tiny_cohort, tmp_path):
    """A stable default_root_dir + --ckpt_path last picks up where a run stopped."""
    first = _fit(
        PRETRAIN, tmp_path, tiny_cohort, "--trainer.max_epochs=1", "--trainer.limit_val_batches=0"
    )
    steps = first.trainer.global_step
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    resumed = _fit(PRETRAIN, tmp_path, tiny_cohort, "--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
                   "--ckpt_path=last")  # fmt: skip
    assert resumed.trainer.global_step == 2 * steps
    assert resumed.model._last_ema_step == 2 * steps  # EMA guard restarted at the resumed step


def test_quickstart_pretraining_is_bit_reproducible(tiny_cohort, tmp_path):
    """Same config, same seed -> the same weights (deterministic: true in the config)."""
    runs = [
        _fit(
            PRETRAIN,
            tmp_path / name,
            tiny_cohort,
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=0",
        )
        for name in ("a", "b")
    ]
    a, b = (r.model.target_encoder.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        runs[0].trainer.callback_metrics["train/loss"]
        == runs[1].trainer.callback_metrics["train/loss"]
    )


def test_diagnostics_logged_only_on_logger_steps_reach_the_logger_unchanged(
    tiny_cohort, tmp_path, monkeypatch
):
    """Skipping ``self.log`` of diagnostics between logger writes (a speed-up) must leave
    what the CSV logger receives exactly as if they were logged on every step."""
    args = ("--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
            "--trainer.log_every_n_steps=2")  # fmt: skip
    gated = _fit(PRETRAIN, tmp_path / "gated", tiny_cohort, *args)
    monkeypatch.setattr(BaseTask, "is_logger_step", lambda self: True)
    _fit(PRETRAIN, tmp_path / "every", tiny_cohort, *args)
    logged = [
        pd.read_csv(next((tmp_path / name).glob("logs/version_*/metrics.csv")))
        for name in ("gated", "every")
    ]
    # train/loss_ehr exists only on batches that drew EHR targets. Logged every step,
    # Lightning writes a *stale* value from an earlier step at a logger step whose batch had
    # none; gated, that step has no value. Everything else must be identical.
    gated_ehr, every_ehr = (f.pop("train/loss_ehr") for f in logged)
    pd.testing.assert_frame_equal(*logged)
    present = gated_ehr.notna()
    assert present.any()
    pd.testing.assert_series_equal(gated_ehr[present], every_ehr[present])
    diagnostics = logged[0].dropna(subset=["train/loss_image"])
    assert len(diagnostics) == gated.trainer.global_step // 2 > 0
    assert diagnostics[["train/ema_momentum", "train/probe_loss"]].notna().all().all()


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_checkpoint_is_refused(subcommand):
    with pytest.raises(SystemExit, match=f"'{subcommand}' needs --ckpt_path"):
        main([subcommand, "--config", FINETUNE])


def test_resumed_finetune_does_not_need_the_pretraining_file(pretrained, tiny_cohort, tmp_path):
    ckpt = tmp_path / "pretrained.ckpt"
    ckpt.write_bytes((pretrained / "checkpoints" / "last.ckpt").read_bytes())
    run = tmp_path / "run"
    first = _fit(
        FINETUNE, run, tiny_cohort, "--trainer.max_epochs=1", f"--model.init_args.init_from={ckpt}"
    )
    ckpt.unlink()  # e.g. cleaned up before a requeued job restarts
    resumed = _fit(FINETUNE, run, tiny_cohort, "--trainer.max_epochs=2", f"--model.init_args.init_from={ckpt}",
                   "--ckpt_path=last")  # fmt: skip
    assert resumed.trainer.global_step == 2 * first.trainer.global_step


def test_the_console_entry_point_shows_info_messages():
    """``init_from``'s "loaded ..." line and the schedules are INFO messages: the console
    entry point prints them (Python's default would hide them), in a fresh process."""
    import subprocess
    import sys

    code = (
        "import logging; from jepa_lightning.main import show_info_messages; "
        "show_info_messages(); logging.getLogger('jepa_lightning.pretrained').info('loaded')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "INFO jepa_lightning.pretrained: loaded" in proc.stderr
