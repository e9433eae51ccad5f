"""Every SSL method under 2-process DDP (gloo, CPU) through the real CLI, with labelled
validation scans absent everywhere, present on one rank only, and present everywhere
(issue 18: the baselines' probe hung the labelled rank in an all-gather the other rank
never joined). And a collective the ranks disagree on ends the run with a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.ct_fixtures import nifti_archive
from tests.helpers import ROOT

METHODS = ROOT / "experiments" / "methods"
SSL_METHODS = ("jepa", "ijepa", "mae", "msn", "msn_ehr", "clip")
HANG_GUARD_S = 1200  # a deadlock fails the test instead of stalling CI (not a speed bound)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_archive")
    path = nifti_archive(root, n_train=12, n_val=6, n_test=2)
    df = pd.read_parquet(path)
    df["image"] = [str(root / p) for p in df["image"]]
    df.to_parquet(path)
    return path


def _config(method: str, manifest: Path, run: Path, callback: str, **trainer) -> Path:
    cfg = yaml.safe_load((METHODS / f"{method}.yaml").read_text())
    cfg["trainer"].update(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, check_val_every_n_epoch=1,
        limit_train_batches=2, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(run), deterministic=False,
        callbacks=[{"class_path": callback}], **trainer,
    )  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    cfg["model"]["init_args"].update(backbone={"embed_dim": 32, "depth": 1, "num_heads": 2})
    if "predictor_dim" in cfg["model"]["init_args"]:
        cfg["model"]["init_args"].update(predictor_dim=16, predictor_heads=2)
    cfg["data"] = {
        "class_path": "CTEHRDataModule",
        "init_args": {"manifest": str(manifest), "image_size": 16, "batch_size": 2,
                      "num_workers": 0, "drop_last": False},
    }  # fmt: skip
    cfg["ddp_timeout_s"] = 120  # a regression fails in minutes, not after torch's 30
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(config: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jepa_lightning", "fit", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    return proc, time.monotonic() - start


@pytest.mark.parametrize("method", SSL_METHODS)
def test_ssl_method_completes_ddp_fit_whatever_the_labelled_validation_layout(
    method, manifest, tmp_path
):
    run = tmp_path / method
    config = _config(method, manifest, run, "tests.ddp_label_layouts.RotateValLabels")
    proc, seconds = _cli(config)
    print(f"{method}: 2-process DDP fit, 3 epochs (no / rank-0-only / all labels): {seconds:.0f} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert "best-epoch selection is off" in proc.stderr  # epoch 0 had no labelled scan
    metrics = pd.read_csv(next(run.glob("logs/version_*/metrics.csv")))
    val = metrics.dropna(subset=["val/loss"]).set_index("epoch")
    assert list(val.index) == [0, 1, 2]
    # the probe is off without labels and on (over both ranks' scans) with them
    probe = val["val/probe_auroc"] if "val/probe_auroc" in val else val.filter(like="probe_auroc")
    probe = probe if isinstance(probe, pd.Series) else probe.iloc[:, 0]
    assert probe.isna()[0] and probe.notna()[1] and probe.notna()[2], val
    assert val["val/rankme"].notna().all()


def test_a_collective_only_one_rank_enters_ends_with_a_timeout(manifest, tmp_path):
    run = tmp_path / "hang"
    config = _config("mae", manifest, run, "tests.ddp_label_layouts.SkipBarrierOnRank1")
    cfg = yaml.safe_load(config.read_text())
    cfg["ddp_timeout_s"] = 20
    config.write_text(yaml.safe_dump(cfg))
    proc, seconds = _cli(config)
    print(f"disagreeing ranks with ddp_timeout_s=20: ended after {seconds:.0f} s")
    assert proc.returncode != 0
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[
        -4000:
    ]
