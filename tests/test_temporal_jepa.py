"""JEPA across time on hand-built patient-sequence batches (the data module's contract)."""

from __future__ import annotations

import pytest
import torch

from jepa_lightning.tasks.temporal_jepa import TemporalJEPA, latest_scan

F = 4


def _task(**kw) -> TemporalJEPA:
    torch.manual_seed(0)
    return TemporalJEPA(
        image_size=16, n_ehr_features=F, backbone={"patch_size": 8, "embed_dim": 24, "depth": 1,
        "num_heads": 2}, predictor_dim=12, predictor_depth=1, predictor_heads=2,
        p_image_only=0.0, p_ehr_only=0.0, reference_metrics=False, **kw,
    )  # fmt: skip


def _batch(task: TemporalJEPA, has_prev=(True, False, True), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s = len(has_prev), 2
    batch = {
        "image": torch.rand(b, s, 1, 16, 16, 16, generator=g),
        "ehr": torch.randn(b, s, F, generator=g),
        "ehr_missing": torch.zeros(b, s, F, dtype=torch.bool),
        "scan_mask": torch.tensor([[p, True] for p in has_prev]),
        "scan_times": torch.tensor([[-200.0 if p else 0.0, 0.0] for p in has_prev]),
        "label": torch.tensor([1.0, float("nan"), 0.0])[:b],
    }
    for i, p in enumerate(has_prev):
        if not p:  # padding, as the data module writes it
            batch["image"][i, 0] = 0
            batch["ehr"][i, 0] = 0
            batch["ehr_missing"][i, 0] = True
    return task.collate_hook()(batch)


def test_losses_are_finite_and_train_the_time_code():
    task = _task()
    out = task.ssl_losses(_batch(task))
    assert torch.isfinite(out["loss"]) and out["loss_across_time"] > 0
    assert out["pairs_share"] == pytest.approx(2 / 3)
    out["loss"].backward()
    assert task.time_embed.proj.weight.grad.abs().sum() > 0
    assert task.encoder.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_patient_without_an_earlier_scan_ignores_its_padding():
    task = _task().eval()
    batch = _batch(task)
    before = task.ssl_losses(batch)["loss"]
    batch["image"][1, 0] = torch.rand(1, 16, 16, 16)  # the padded slot of patient 1
    assert torch.equal(task.ssl_losses(batch)["loss"], before)


def test_single_scans_fall_back_to_the_within_scan_objective():
    task = _task().eval()
    batch = _batch(task, has_prev=(False, False, False))
    out = task.ssl_losses(batch)
    assert out["loss_across_time"] == 0 and out["pairs_share"] == 0
    assert torch.equal(out["loss"], task.jepa_losses(latest_scan(batch))["loss"])


def test_the_elapsed_time_changes_the_prediction():
    task = _task().eval()
    batch = _batch(task)
    first = task.ssl_losses(batch)["loss_across_time"]
    batch["scan_times"][:, 0] = torch.where(batch["scan_mask"][:, 0], -700.0, 0.0)
    assert not torch.equal(task.ssl_losses(batch)["loss_across_time"], first)


def test_a_single_scan_batch_is_refused_with_the_setting_to_change():
    task = _task()
    batch = _batch(task)
    single = {**latest_scan(batch)}
    with pytest.raises(KeyError, match="sequence: true"):
        task.ssl_losses(single)
