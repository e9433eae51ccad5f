"""Taking the encoder away (issue 14, case 9): ``jepa_lightning.load_encoder`` returns the
plain module with its preprocessing and EHR normalisation, and ``python -m
jepa_lightning.embed`` writes the same embeddings the training code path computes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import jepa_lightning
from jepa_lightning.embed import main as embed_main
from jepa_lightning.main import main
from jepa_lightning.tasks import DiagnosisTask
from tests.ct_fixtures import nifti_archive
from tests.helpers import QUIET

METHODS = Path(__file__).resolve().parents[1] / "experiments" / "methods"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("encoder_export")
    manifest = nifti_archive(root / "archive", n_train=8, n_val=4, n_test=4)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(manifest), "image_size": 16, "batch_size": 4, "drop_last": False,
        "hu_window": [-900, 300], "preprocess": {"spacing": [1.5, 1.5, 2.0]}}}}))  # fmt: skip
    run = root / "run"
    cli = main(["fit", "--config", str(METHODS / "msn_ehr.yaml"), "--config", str(data),
                f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
                "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
                "--model.init_args.backbone.embed_dim=32", "--model.init_args.backbone.depth=1", *QUIET])  # fmt: skip
    return run / "checkpoints" / "last.ckpt", manifest, cli


def test_load_encoder_returns_module_preprocessing_and_ehr_normalisation(pretrained):
    ckpt, _, cli = pretrained
    enc = jepa_lightning.load_encoder(ckpt)
    assert isinstance(enc.encoder, nn.Module) and not enc.encoder.training
    assert enc.source == "target_encoder"  # MSN's EMA target
    assert enc.preprocessing["image_size"] == [16, 16, 16]
    assert enc.preprocessing["hu_window"] == [-900.0, 300.0]
    assert list(enc.preprocessing["preprocess"]["spacing"]) == [1.5, 1.5, 2.0]
    assert enc.ehr_normalisation == cli.datamodule.ehr_stats
    for key, value in cli.model.target_encoder.state_dict().items():
        torch.testing.assert_close(enc.encoder.state_dict()[key], value)


def test_embed_command_gives_the_training_code_path_embeddings(pretrained, tmp_path):
    ckpt, manifest, cli = pretrained
    out = tmp_path / "emb.parquet"
    assert embed_main([str(ckpt), str(manifest), "--out", str(out), "--split", "test"]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 4 and table.filter(like="emb_").shape[1] == 32
    # the training code path: DiagnosisTask initialised from the checkpoint, on the data
    # module the pretraining CLI built (same preprocessing and EHR statistics)
    hp = cli.model.hparams
    task = DiagnosisTask(
        modalities="image",
        **{k: hp[k] for k in ("image_size", "n_ehr_features", "backbone")},
    )
    task.initialise_from_checkpoint(str(ckpt))
    task.eval()
    dm = cli.datamodule
    dm.predict_split = "test"
    dm.setup("predict")
    with torch.no_grad():
        expected = torch.cat([task.features(b) for b in dm.predict_dataloader()])
    got = torch.tensor(table.filter(like="emb_").to_numpy())
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    assert table["scan_id"].tolist() == dm.dataset("predict").table["scan_id"].tolist()
