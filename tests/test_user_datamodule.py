"""A user's own LightningDataModule, written the way a user would (torch Datasets of the
documented dicts, the default collate), trains the tasks through a plain Trainer and through
the CLI; one whose batches miss a documented key is refused on its first batch, naming it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from jepa_lightning.main import main
from jepa_lightning.tasks import (
    MAE,
    MSN,
    DiagnosisTask,
    ImageEHRContrastive,
    JEPAContrastive,
    MultimodalJEPA,
)

SIZE, FEATURES = 16, 5
TINY_BACKBONE = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}


class ScanDataset(Dataset):
    """Random scans whose label is the sign of the mean intensity."""

    def __init__(self, n: int, seed: int, drop: str | None = None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
        self.ehr = torch.randn(n, FEATURES, generator=g)
        self.drop = drop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        sample = {
            "image": self.images[i],
            "ehr": self.ehr[i],
            "ehr_missing": torch.zeros(FEATURES, dtype=torch.bool),
            "label": torch.tensor(float(self.images[i].mean() > 0)),
            "patient_id": f"p{i}",
            "scan_id": f"s{i}",
            "cohort": "internal",
        }
        if self.drop:
            del sample[self.drop]
        return sample


class UserDataModule(L.LightningDataModule):
    """What a user writes: no collate_hook, no dataset(split), no cohorts."""

    def __init__(self, image_size: int = SIZE, n_ehr_features: int = FEATURES, drop: str = ""):
        super().__init__()
        self.image_size, self.n_ehr_features, self.drop = image_size, n_ehr_features, drop or None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ScanDataset(12, 0, self.drop), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ScanDataset(8, 1, self.drop), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(ScanDataset(8, 2, self.drop), batch_size=4)


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def test_a_plain_trainer_trains_jepa_on_a_user_data_module(tmp_path, caplog):
    task = MultimodalJEPA(image_size=SIZE, n_ehr_features=FEATURES, backbone=TINY_BACKBONE,
                          predictor_dim=8, predictor_depth=1, predictor_heads=2)  # fmt: skip
    before = [p.detach().clone() for p in task.encoder.parameters()]
    with caplog.at_level("INFO"):
        _trainer(tmp_path).fit(task, datamodule=UserDataModule())
    moved = any(
        not torch.equal(a, b) for a, b in zip(before, task.encoder.parameters(), strict=True)
    )
    assert moved  # it trained: the masks were drawn in the step
    assert "has no TakesCollateHook" in caplog.text and "main process" in caplog.text
    assert "has no SplitDatasets" in caplog.text and "reference monitors" in caplog.text


@pytest.mark.parametrize("task_class", [MAE, MSN, ImageEHRContrastive, JEPAContrastive])
def test_a_plain_trainer_trains_every_pretraining_task_on_a_user_data_module(tmp_path, task_class):
    """The other single-scan tasks (the sequence tasks take sequence batches, their own
    contract in data_modules/sequences.py)."""
    task = task_class(image_size=SIZE, n_ehr_features=FEATURES, backbone=TINY_BACKBONE)
    before = [p.detach().clone() for p in task.encoder.parameters()]
    _trainer(tmp_path).fit(task, datamodule=UserDataModule())
    after = task.encoder.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_plain_trainer_finetunes_and_tests_on_a_user_data_module(tmp_path):
    task = DiagnosisTask(image_size=SIZE, n_ehr_features=FEATURES, backbone=TINY_BACKBONE)
    trainer = _trainer(tmp_path)
    dm = UserDataModule()
    trainer.fit(task, datamodule=dm)
    (metrics,) = trainer.test(task, datamodule=dm, verbose=False)
    assert "test/all/auroc" in metrics  # no cohorts named: one cohort, "all"


def test_the_cli_trains_jepa_on_a_user_data_module(tmp_path):
    cli = main([
        "fit", "--model=MultimodalJEPA", f"--model.init_args.backbone={TINY_BACKBONE}",
        "--model.init_args.predictor_dim=8", "--model.init_args.predictor_depth=1",
        "--model.init_args.predictor_heads=2", "--data=tests.test_user_datamodule.UserDataModule",
        "--trainer.max_epochs=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_batch_without_a_documented_key_is_refused_naming_it(tmp_path):
    task = DiagnosisTask(image_size=SIZE, n_ehr_features=FEATURES, backbone=TINY_BACKBONE)
    with pytest.raises(KeyError, match=r"the batch has no \['ehr_missing'\]"):
        _trainer(tmp_path).fit(task, datamodule=UserDataModule(drop="ehr_missing"))


class SizelessDataModule(UserDataModule):
    """Forgets to say what the model is sized from."""

    def __init__(self):
        super().__init__()
        del self.image_size


def test_the_cli_refuses_a_data_module_without_the_model_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"has no \['image_size'\].*data\.image_size"):
        main([
            "fit", "--model=DiagnosisTask", "--data=tests.test_user_datamodule.SizelessDataModule",
            "--trainer.max_epochs=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        ])  # fmt: skip
