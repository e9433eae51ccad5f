"""Unit tests for jepa_lightning.masking: 3-D multi-block masks, EHR masks, the collator."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import jepa_lightning.masking as masking
from jepa_lightning.masking import (
    JEPAMaskCollator,
    block_indices,
    ehr_token_masks,
    multiblock_masks,
    random_subset,
    sample_block_shape,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zyx(index: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Raster index -> (z, y, x) coordinates."""
    _, gh, gw = grid
    return index // (gh * gw), (index // gw) % gh, index % gw


# --------------------------------------------------------------------------- multiblock_masks


@pytest.mark.parametrize("grid", [(4, 4, 4), (3, 4, 5), (2, 4, 4), (6, 5, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiblock_masks_invariants(grid, seed):
    batch, n_blocks = 6, 3
    g = _gen(seed)
    # Draw the block shape the same way multiblock_masks does, to know the target length.
    expected_shape = sample_block_shape(grid, (0.1, 0.15), (0.75, 1.5), (0.75, 1.5), _gen(seed))
    targets, context = multiblock_masks(
        batch, grid, g, n_blocks=n_blocks, scale=(0.1, 0.15), min_context=4
    )
    n = math.prod(grid)
    assert targets.dtype == torch.long and context.dtype == torch.long
    assert targets.shape == (batch, n_blocks * math.prod(expected_shape))
    assert context.shape[0] == batch and context.shape[1] >= 4  # same length for every sample
    for idx in (targets, context):
        assert int(idx.min()) >= 0 and int(idx.max()) < n
    for b in range(batch):
        ctx, tgt = context[b], targets[b]
        assert ctx.unique().numel() == ctx.numel(), "duplicate context index"
        assert not torch.isin(ctx, tgt).any(), "context and target overlap"
        assert torch.equal(ctx, ctx.sort().values)
        # Each block is a contiguous box of the declared shape.
        bd, bh, bw = expected_shape
        for block in tgt.split(bd * bh * bw):
            z, y, x = _zyx(block, grid)
            assert (int(z.max() - z.min()) + 1, int(y.max() - y.min()) + 1) == (bd, bh)
            assert int(x.max() - x.min()) + 1 == bw
            assert block.unique().numel() == block.numel()


def test_multiblock_masks_context_is_smallest_complement():
    grid, batch = (4, 4, 4), 8
    targets, context = multiblock_masks(batch, grid, _gen(3))
    n = math.prod(grid)
    complement_sizes = [n - targets[b].unique().numel() for b in range(batch)]
    assert context.shape[1] == min(complement_sizes)


def test_multiblock_masks_raises_when_no_room_for_context():
    with pytest.raises(ValueError, match="context"):
        multiblock_masks(2, (2, 2, 2), _gen(0), n_blocks=4, scale=(0.9, 1.0), min_context=4)


# --------------------------------------------------------------------------- block placement


@pytest.mark.parametrize(
    "grid, shape",
    [
        ((3, 4, 5), (2, 2, 2)),
        ((3, 4, 5), (1, 3, 2)),
        ((2, 4, 4), (1, 2, 2)),
        ((2, 4, 4), (1, 3, 3)),
    ],
)
def test_block_indices_reach_every_border(grid, shape):
    g = _gen(0)
    lo = [math.inf] * 3
    hi = [-math.inf] * 3
    for _ in range(300):
        idx = block_indices(grid, shape, g)
        assert idx.numel() == math.prod(shape)
        for axis, coord in enumerate(_zyx(idx, grid)):
            lo[axis] = min(lo[axis], int(coord.min()))
            hi[axis] = max(hi[axis], int(coord.max()))
    assert lo == [0, 0, 0]
    assert hi == [g_ - 1 for g_ in grid]


@pytest.mark.parametrize("grid", [(3, 4, 5), (2, 4, 4)])
def test_multiblock_targets_reach_every_border(grid):
    g = _gen(1)
    lo = [math.inf] * 3
    hi = [-math.inf] * 3
    shapes_smaller_than_grid = [False, False, False]
    for _ in range(150):
        targets, _ = multiblock_masks(2, grid, g, n_blocks=1, scale=(0.05, 0.15))
        z, y, x = _zyx(targets, grid)
        for axis, coord in enumerate((z, y, x)):
            lo[axis] = min(lo[axis], int(coord.min()))
            hi[axis] = max(hi[axis], int(coord.max()))
            extent = int(coord[0].max() - coord[0].min()) + 1
            shapes_smaller_than_grid[axis] |= extent < grid[axis]
    # The check is only informative when blocks are smaller than the grid on every axis.
    assert all(shapes_smaller_than_grid)
    assert lo == [0, 0, 0]
    assert hi == [g_ - 1 for g_ in grid]


# --------------------------------------------------------------------------- equalisation


def test_random_subset_is_uniform_over_members():
    complement = torch.arange(0, 160, 4)  # 40 raster-ordered indices
    k, draws = 10, 4000
    counts = torch.zeros(160)
    g = _gen(0)
    for _ in range(draws):
        pick = random_subset(complement, k, g)
        assert pick.numel() == k
        assert pick.unique().numel() == k
        assert torch.isin(pick, complement).all()
        assert torch.equal(pick, pick.sort().values)
        counts[pick] += 1
    p = k / complement.numel()
    expected = draws * p
    sigma = math.sqrt(draws * p * (1 - p))
    member_counts = counts[complement]
    assert counts.sum() == draws * k
    assert (member_counts - expected).abs().max() < 5 * sigma, member_counts
    # First and last members (raster order) are not favoured over one another.
    first, last = member_counts[:k].mean(), member_counts[-k:].mean()
    assert abs(float(first - last)) < 3 * sigma


def test_random_subset_rejects_k_too_large():
    with pytest.raises(ValueError):
        random_subset(torch.arange(5), 6, _gen(0))


def _context_axis_frequencies(grid, n_batches=200, batch=8, seed=0):
    """Share of context indices falling in each z slice, y row and x column."""
    g = _gen(seed)
    counts = torch.zeros(math.prod(grid))
    for _ in range(n_batches):
        _, context = multiblock_masks(batch, grid, g)
        counts += torch.bincount(context.reshape(-1), minlength=counts.numel()).float()
    counts = counts.reshape(grid)
    total = counts.sum()
    return [counts.sum(dims) / total for dims in ((1, 2), (0, 2), (0, 1))]


def _mirror_symmetric(freqs: list[torch.Tensor], rel_tol: float = 0.12) -> bool:
    """p[i] ~ p[g-1-i] on every axis (relative difference below rel_tol), and the last
    slice is not starved compared with the first."""
    for p in freqs:
        rel = (p - p.flip(0)).abs() / ((p + p.flip(0)) / 2)
        if float(rel.max()) > rel_tol:
            return False
        if float(p[-1]) < (1 - rel_tol) * float(p[0]):
            return False
    return True


def test_context_marginals_are_mirror_symmetric():
    freqs = _context_axis_frequencies((4, 4, 4))
    for p in freqs:
        assert torch.isclose(p.sum(), torch.tensor(1.0))
    assert _mirror_symmetric(freqs), [f.tolist() for f in freqs]


def test_symmetry_check_detects_truncating_equaliser(monkeypatch):
    """Companion check: the same predicate fails for the reference-code bug (keep the first
    k of the raster-ordered complement), so the test above can detect it."""

    def truncating_subset(index: torch.Tensor, k: int, generator: torch.Generator):
        return index[:k]

    monkeypatch.setattr(masking, "random_subset", truncating_subset)
    freqs = _context_axis_frequencies((4, 4, 4))
    assert not _mirror_symmetric(freqs)
    z = freqs[0]
    assert float(z[-1]) < 0.8 * float(z[0])  # last slice starved of context


# --------------------------------------------------------------------------- block shapes


@pytest.mark.parametrize("grid", [(4, 4, 4), (2, 6, 8), (8, 3, 3), (1, 5, 5)])
def test_sample_block_shape_within_bounds(grid):
    g = _gen(0)
    for scale, z_scale in [((0.01, 0.05), (0.75, 1.5)), ((0.5, 1.0), (0.1, 10.0))]:
        for _ in range(200):
            shape = sample_block_shape(grid, scale, (0.3, 3.0), z_scale, g)
            assert len(shape) == 3
            assert all(isinstance(e, int) for e in shape)
            assert all(1 <= e <= gg for e, gg in zip(shape, grid, strict=True)), shape


def test_sample_block_shape_z_scale_stretches_z():
    grid = (16, 16, 16)

    def mean_extents(z_scale):
        g = _gen(0)
        shapes = torch.tensor(
            [sample_block_shape(grid, (0.1, 0.15), (0.75, 1.5), z_scale, g) for _ in range(200)],
            dtype=torch.float,
        )
        return shapes.mean(0)

    flat, tall = mean_extents((0.5, 0.6)), mean_extents((2.0, 2.5))
    assert tall[0] > flat[0] + 1.0
    # In-plane extents shrink to keep the block volume.
    assert tall[1] < flat[1] and tall[2] < flat[2]


def test_sample_block_shape_scale_sets_volume():
    grid = (8, 8, 8)
    g = _gen(0)
    small = [math.prod(sample_block_shape(grid, (0.05, 0.05), (1, 1), (1, 1), g)) for _ in range(5)]
    big = [math.prod(sample_block_shape(grid, (0.4, 0.4), (1, 1), (1, 1), g)) for _ in range(5)]
    # 0.05 * 512 = 25.6 -> ~3^3; 0.4 * 512 = 204.8 -> ~6^3.
    assert all(v == 27 for v in small)
    assert all(v == 216 for v in big)


# --------------------------------------------------------------------------- EHR masks


@pytest.mark.parametrize("n_features", [2, 7, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_ehr_token_masks_partition(n_features, seed):
    batch = 5
    tgt, ctx = ehr_token_masks(batch, n_features, _gen(seed), ratio=(0.3, 0.6))
    assert tgt.shape[0] == ctx.shape[0] == batch
    assert tgt.shape[1] + ctx.shape[1] == n_features
    assert 1 <= tgt.shape[1] <= n_features - 1
    for b in range(batch):
        assert not torch.isin(tgt[b], ctx[b]).any()
        union = torch.cat([tgt[b], ctx[b]]).sort().values
        assert torch.equal(union, torch.arange(n_features))


def test_ehr_token_masks_ratio_and_variety():
    n_features = 20
    g = _gen(0)
    counts = set()
    rows = set()
    for _ in range(50):
        tgt, _ = ehr_token_masks(4, n_features, g, ratio=(0.3, 0.6))
        counts.add(tgt.shape[1])
        rows.update(tuple(r.tolist()) for r in tgt)
    assert min(counts) >= round(0.3 * n_features) and max(counts) <= round(0.6 * n_features)
    assert len(counts) > 1  # the ratio is drawn, not fixed
    assert len(rows) > 100  # the split is random per sample


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

    from data_modules.ct_ehr import BatchCollator

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
