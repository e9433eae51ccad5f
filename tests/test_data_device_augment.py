"""Augmentation as batched tensor ops after the batch transfer: the same transforms as MONAI's
per-sample path, the same distribution, reproducible under a seed, training batches only."""

from __future__ import annotations

import math

import lightning
import numpy as np
import pytest
import torch
from monai.transforms import Affine

from data_modules.batch_augment import BatchAugment
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTAugment
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti


def _smooth(shape, seed=0):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1)


def test_affine_equals_monais_affine_on_a_non_cubic_volume():
    x = _smooth((1, 1, 12, 10, 14))
    angles, scales = torch.tensor([[0.15, -0.1, 0.2]]), torch.tensor([[1.08, 0.93, 1.05]])
    ours = BatchAugment.affine(x, angles, scales)[0]
    monai = Affine(rotate_params=angles[0].tolist(), scale_params=scales[0].tolist(),
                   padding_mode="border", mode="bilinear", image_only=True)  # fmt: skip
    assert torch.allclose(ours, torch.as_tensor(monai(x[0])), atol=1e-5)


def _orientation_code(volume: torch.Tensor) -> int:
    """Which of the 48 flips/turns a volume with a unique corner marker shows: the corner the
    marker sits in and the marker's axial neighbour direction."""
    return int(volume.reshape(-1).argmax())


def test_flips_and_turns_have_monais_distribution():
    """The marker's final position over many draws: the device path and MONAI's per-sample
    path give the same frequencies (chi-square)."""
    cfg = CTAugment(flip_prob=0.5, rot90_prob=0.5, intensity_prob=0.0)
    base = torch.zeros(1, 4, 4, 4)
    base[0, 0, 0, 1] = 1.0  # off the diagonal, so every flip and turn moves it differently
    n = 4000
    torch.manual_seed(0)
    device = BatchAugment(cfg)(base.expand(n, 1, 4, 4, 4).clone())
    cpu = cfg.build([4, 4, 4])
    cpu.set_random_state(seed=1)
    loader = [int(torch.as_tensor(cpu(base)).reshape(-1).argmax()) for _ in range(n)]
    ours = [int(v.reshape(-1).argmax()) for v in device]
    cells = sorted(set(ours) | set(loader))
    a = np.array([ours.count(c) for c in cells], dtype=float)
    b = np.array([loader.count(c) for c in cells], dtype=float)
    assert len(cells) > 8  # many distinct outcomes
    chi2 = (((a - b) ** 2) / (a + b)).sum()
    assert chi2 < 2.0 * len(cells) + 20  # well inside chance for len(cells) - 1 degrees of freedom


def test_intensity_shift_has_monais_distribution():
    cfg = CTAugment(flip_prob=0.0, rot90_prob=0.0, intensity_shift=0.05, intensity_prob=0.5)
    n = 4000
    torch.manual_seed(0)
    device = BatchAugment(cfg)(torch.zeros(n, 1, 2, 2, 2))[:, 0, 0, 0, 0].numpy()
    cpu = cfg.build([2, 2, 2])
    cpu.set_random_state(seed=1)
    loader = np.array(
        [float(torch.as_tensor(cpu(torch.zeros(1, 2, 2, 2)))[0, 0, 0, 0]) for _ in range(n)]
    )
    for values in (device, loader):
        assert abs((values == 0).mean() - 0.5) < 0.04
        shifted = values[values != 0]
        assert abs(shifted.mean()) < 0.004 and abs(shifted.std() - 0.05 / math.sqrt(3)) < 0.003
        assert np.abs(values).max() <= 0.05


def test_the_same_seed_draws_the_same_augmentation_and_another_differs():
    cfg = CTAugment(affine_prob=0.5)
    x = _smooth((6, 1, 8, 8, 8))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(BatchAugment(cfg)(x))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.fixture
def archive(tmp_path):
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        path = write_nifti(tmp_path / f"v{i}.nii.gz", blob_volume(centre_vox=(4, 6, 5)), np.eye(4))
        rows.append({"image": str(path), "split": split})
    return write_manifest(tmp_path, rows)


def test_device_augmentation_runs_on_training_batches_only(archive):
    aug = CTAugment(flip_prob=1.0, rot90_prob=0.0, intensity_prob=0.0)
    kw = dict(image_size=8, batch_size=2, augment=aug, drop_last=False)
    loader_dm = CTEHRDataModule(str(archive), **kw)
    device_dm = CTEHRDataModule(str(archive), augment_on="device", **kw)
    plain = CTEHRDataModule(str(archive), image_size=8, batch_size=2, drop_last=False)
    for dm in (loader_dm, device_dm, plain):
        dm.setup("fit")
    assert device_dm.dataset("train").augment is None  # workers only read and collate
    codes = next(iter(device_dm.train_dataloader()))["image"]
    assert codes.dtype == torch.int16  # half the bytes through the queue and the transfer
    assert device_dm.dataset("train")[0]["image"].dtype == torch.float32  # other readers: float

    class _Trainer:  # what the hook and the loaders read
        training, world_size, global_rank = True, 1, 0

    device_dm.trainer = _Trainer()  # type: ignore[assignment]
    raw = next(iter(plain.train_dataloader()))["image"]
    flipped = raw.flip(2).flip(3).flip(4)  # every axis flipped (flip_prob 1)
    by_loader = next(iter(loader_dm.train_dataloader()))["image"]
    by_device = device_dm.on_after_batch_transfer(next(iter(device_dm.train_dataloader())), 0)[
        "image"
    ]
    assert torch.equal(by_loader, flipped) and torch.equal(by_device, flipped)
    _Trainer.training = False  # validation inside fit: untouched
    val = device_dm.on_after_batch_transfer(next(iter(device_dm.val_dataloader())), 0)["image"]
    assert torch.equal(val, next(iter(plain.val_dataloader()))["image"])


def test_device_augmentation_is_refused_for_sequences_and_unknown_places(archive):
    with pytest.raises(ValueError, match="sequence"):
        CTEHRDataModule(str(archive), augment=CTAugment(), augment_on="device", sequence=True)
    with pytest.raises(ValueError, match="augment_on"):
        CTEHRDataModule(str(archive), augment_on="gpu")  # type: ignore[arg-type]


def test_a_fit_with_device_augmentation_is_reproducible(archive, tmp_path):
    from jepa_lightning.tasks import MultimodalJEPA

    def fit(seed):
        lightning.seed_everything(seed)
        dm = CTEHRDataModule(str(archive), image_size=16, batch_size=2, augment=CTAugment(affine_prob=0.5),
                             augment_on="device", num_workers=0)  # fmt: skip
        task = MultimodalJEPA(image_size=16, n_ehr_features=2, predictor_dim=8, predictor_depth=1,
                              predictor_heads=2, backbone={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2})  # fmt: skip
        trainer = lightning.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                                    default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(task, datamodule=dm)
        return torch.cat([p.detach().reshape(-1) for p in task.encoder.parameters()])

    a, b = fit(0), fit(0)
    assert torch.equal(a, b)
