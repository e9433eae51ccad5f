"""Pretraining on an unlabelled archive (issue 14, case 1): the commonest real case.

Every pretraining config selects its checkpoint by ``val/probe_auroc``, the online probe on
labelled validation scans. Without any (no ``label`` column, or labels only in training),
the run must still finish, with one log line and ``last.ckpt`` as the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from jepa_lightning.main import main
from tests.ct_fixtures import nifti_archive
from tests.helpers import QUIET

METHODS = Path(__file__).resolve().parents[1] / "experiments" / "methods"
SMALL = [
    "--model.init_args.backbone.embed_dim=48",
    "--model.init_args.backbone.depth=1",
    "--model.init_args.backbone.patch_size=8",
]


def _manifest(tmp_path: Path, labels: str) -> Path:
    df = pd.read_parquet(nifti_archive(tmp_path / "archive"))
    df["image"] = [str(tmp_path / "archive" / p) for p in df["image"]]
    if labels == "none":
        df = df.drop(columns=["label"])
    elif labels == "train_only":
        df.loc[df["split"] != "train", "label"] = float("nan")
    path = tmp_path / f"manifest_{labels}.parquet"
    df.to_parquet(path)
    return path


def _data_yaml(tmp_path: Path, manifest: Path) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "class_path": "CTEHRDataModule",
                    "init_args": {
                        "manifest": str(manifest),
                        "image_size": 16,
                        "batch_size": 8,
                        "num_workers": 0,
                        "drop_last": False,
                    },
                }
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    "method, labels",
    [("jepa", "none"), ("msn", "none"), ("mae", "train_only"), ("clip", "none")],
)
def test_pretraining_without_labelled_validation_scans_keeps_last(method, labels, tmp_path, caplog):
    manifest = _manifest(tmp_path, labels)
    run = tmp_path / "run"
    config = yaml.safe_load((METHODS / f"{method}.yaml").read_text())
    assert config["checkpoint"]["monitor"] == "val/probe_auroc"  # what the user runs
    with caplog.at_level(logging.INFO):
        cli = main(
            ["fit", "--config", str(METHODS / f"{method}.yaml"),
             "--config", _data_yaml(tmp_path, manifest),
             f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
             "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1",
             "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             *QUIET, *SMALL]
        )  # fmt: skip
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 2
    assert "val/probe_auroc" not in cli.trainer.callback_metrics
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == cli.trainer.global_step > 0
    lines = [
        r.getMessage() for r in caplog.records if "best-epoch selection is off" in r.getMessage()
    ]
    assert len(lines) == 1, lines  # one line, not one per epoch
    assert "the validation split has no labelled scan" in lines[0]
    assert "falls back to last.ckpt" in lines[0]
