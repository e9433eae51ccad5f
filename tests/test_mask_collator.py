"""The JEPA mask collator: modes, ranks, workers, resumable streams; step generators."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import jepa_lightning.masking as masking
from jepa_lightning.masking import (
    JEPAMaskCollator,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zyx(index: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Raster index -> (z, y, x) coordinates."""
    _, gh, gw = grid
    return index // (gh * gw), (index // gw) % gh, index % gw


# --------------------------------------------------------------------------- collator


def _collator(**kw) -> JEPAMaskCollator:
    kw.setdefault("grid", (4, 4, 4))
    kw.setdefault("n_ehr_features", 6)
    return JEPAMaskCollator(**kw)


def _same_masks(a: dict, b: dict) -> bool:
    if a["jepa_mode"] != b["jepa_mode"]:
        return False
    keys = ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx")
    return all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture
def rank0(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("SLURM_PROCID", raising=False)


def test_collator_mode_frequencies(rank0):
    torch.manual_seed(0)
    c = _collator(grid=(2, 4, 4), n_blocks=2, p_image_only=0.3, p_ehr_only=0.3)
    n = 600
    modes = [c.masks(1)["jepa_mode"] for _ in range(n)]
    for mode, p in [("image_to_ehr", 0.3), ("ehr_to_image", 0.3), ("joint", 0.4)]:
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(modes.count(mode) - n * p) < 4 * sigma, (mode, modes.count(mode))


def test_collator_call_adds_masks(rank0):
    torch.manual_seed(0)
    c = _collator()
    batch = {"image": torch.zeros(3, 1, 4, 4, 4), "ehr": torch.zeros(3, 6)}
    out = c(batch)
    for key in ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx"):
        assert out[key].dtype == torch.long and out[key].shape[0] == 3
    assert out["jepa_mode"] in masking.JEPA_MODES
    assert "image" in out and "ehr" in out


def test_collator_joint_mode(rank0):
    torch.manual_seed(0)
    c = _collator(p_image_only=0.0, p_ehr_only=0.0)
    m = c.masks(4)
    assert m["jepa_mode"] == "joint"
    assert m["ctx_image_idx"].shape[1] > 0 and m["tgt_image_idx"].shape[1] > 0
    assert m["ctx_ehr_idx"].shape[1] > 0 and m["tgt_ehr_idx"].shape[1] > 0
    assert m["ctx_ehr_idx"].shape[1] + m["tgt_ehr_idx"].shape[1] == 6
    for b in range(4):
        assert not torch.isin(m["ctx_image_idx"][b], m["tgt_image_idx"][b]).any()
        assert not torch.isin(m["ctx_ehr_idx"][b], m["tgt_ehr_idx"][b]).any()


def test_collator_ehr_to_image_mode(rank0):
    torch.manual_seed(0)
    c = _collator(p_image_only=0.0, p_ehr_only=1.0)
    m = c.masks(3)
    assert m["jepa_mode"] == "ehr_to_image"
    assert m["ctx_image_idx"].shape == (3, 0)
    assert torch.equal(m["ctx_ehr_idx"], torch.arange(6).expand(3, -1))
    assert m["tgt_ehr_idx"].shape == (3, 0)
    assert m["tgt_image_idx"].shape[1] > 0


def test_collator_image_to_ehr_mode(rank0):
    torch.manual_seed(0)
    c = _collator(p_image_only=1.0, p_ehr_only=0.0)
    m = c.masks(3)
    assert m["jepa_mode"] == "image_to_ehr"
    assert m["ctx_ehr_idx"].shape == (3, 0)
    assert torch.equal(m["tgt_ehr_idx"], torch.arange(6).expand(3, -1))
    assert m["ctx_image_idx"].shape[1] > 0 and m["tgt_image_idx"].shape[1] > 0
    for b in range(3):
        assert not torch.isin(m["ctx_image_idx"][b], m["tgt_image_idx"][b]).any()


def test_collator_without_ehr(rank0):
    torch.manual_seed(0)
    # Even with modality-drop probabilities set, no EHR means image-only joint masks.
    c = _collator(use_ehr=False, p_image_only=0.5, p_ehr_only=0.5)
    for _ in range(20):
        m = c.masks(2)
        assert m["jepa_mode"] == "joint"
        assert m["ctx_ehr_idx"].shape == (2, 0) and m["tgt_ehr_idx"].shape == (2, 0)
        assert m["ctx_ehr_idx"].dtype == torch.long
        assert m["ctx_image_idx"].shape[1] > 0 and m["tgt_image_idx"].shape[1] > 0


def test_collator_rejects_probabilities_above_one():
    with pytest.raises(ValueError):
        _collator(p_image_only=0.6, p_ehr_only=0.5)


def test_collator_is_picklable(rank0):
    torch.manual_seed(7)
    c = _collator()
    c.masks(2)  # materialise its generator
    clone = pickle.loads(pickle.dumps(c))
    m = clone.masks(2)
    assert m["tgt_image_idx"].shape[0] == 2
    # The clone re-seeds from the process seed: it draws what a fresh collator would draw.
    assert _same_masks(m, _collator().masks(2))
    # And the original keeps working after being pickled.
    assert c.masks(2)["ctx_image_idx"].shape[0] == 2


def test_collator_rank_seeding(monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    def draw(rank: str, seed: int) -> list[dict]:
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(seed)
        c = _collator()
        return [c.masks(4) for _ in range(3)]

    r0 = draw("0", 123)
    r1 = draw("1", 123)
    r0_again = draw("0", 123)
    r0_other_seed = draw("0", 124)
    assert all(_same_masks(a, b) for a, b in zip(r0, r0_again, strict=True))
    assert not any(_same_masks(a, b) for a, b in zip(r0, r1, strict=True))
    assert not any(_same_masks(a, b) for a, b in zip(r0, r0_other_seed, strict=True))


def test_collator_follows_process_seed_change(rank0):
    """A worker re-seeded by the loader (new torch seed) gets a new mask stream."""
    c = _collator()
    torch.manual_seed(5)
    a = c.masks(4)
    torch.manual_seed(6)
    b = c.masks(4)
    torch.manual_seed(5)
    fresh = _collator().masks(4)
    assert not _same_masks(a, b)
    assert _same_masks(a, fresh)


def test_masks_differ_across_loader_workers(rank0):
    """Two DataLoader workers (the collator runs in them) draw different mask streams."""
    from torch.utils.data import DataLoader

    from data_modules.dataset import BatchCollator

    data = [{"image": torch.zeros(1)} for _ in range(8)]
    torch.manual_seed(0)
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=BatchCollator(_collator()))
    batches = list(loader)  # batch i comes from worker i % 2
    w0, w1 = batches[0::2], batches[1::2]
    assert not any(_same_masks(a, b) for a, b in zip(w0, w1, strict=True))


def test_collator_state_round_trip_resumes_the_stream(rank0):
    """What a checkpoint stores lets a fresh collator continue where the old one was."""
    torch.manual_seed(3)
    c = _collator()
    c.masks(2)
    state = c.state_dict()
    expected = [c.masks(2) for _ in range(3)]
    resumed = _collator()
    resumed.load_state_dict(state)
    assert all(_same_masks(a, resumed.masks(2)) for a in expected)
    other_rank = _collator(rank=1)
    other_rank.load_state_dict(state)  # rank 0's state is ignored on rank 1: streams stay distinct
    assert not _same_masks(expected[0], other_rank.masks(2))


def test_step_generator_is_distinct_per_rank_and_reproducible_per_step():
    from jepa_lightning.masking import random_masks, step_generator

    def keep(rank, step, batch_idx=0):
        return random_masks(4, 64, 16, generator=step_generator(7, rank, step, batch_idx))[0]

    assert torch.equal(keep(0, 5), keep(0, 5))  # a resumed run redraws the same masks
    assert not torch.equal(keep(0, 5), keep(1, 5))  # DDP ranks draw their own masks
    assert not torch.equal(keep(0, 5), keep(0, 6))
    assert not torch.equal(keep(0, 5, 0), keep(0, 5, 1))  # accumulated micro-batches differ


def test_mae_and_msn_draw_step_masks_from_the_given_generator():
    from jepa_lightning.masking import step_generator
    from jepa_lightning.tasks import MAE, MSN

    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 1, 32, 32, 32, generator=g),
        "ehr": torch.randn(2, 12, generator=g),
        "ehr_missing": torch.zeros(2, 12, dtype=torch.bool),
        "label": torch.tensor([0.0, 1.0]),
    }
    for model in (
        MAE(n_ehr_features=12, backbone={"embed_dim": 48, "depth": 1}),
        MSN(n_ehr_features=12, backbone={"embed_dim": 48, "depth": 1}),
    ):
        model.eval()
        with torch.no_grad():
            same = [model.ssl_losses(batch, step_generator(0, 0, 3, 0))["loss"] for _ in range(2)]
            other = model.ssl_losses(batch, step_generator(0, 1, 3, 0))["loss"]
        assert torch.equal(same[0], same[1])
        assert not torch.equal(same[0], other)
