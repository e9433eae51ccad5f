"""Unit tests for jepa_lightning.masking: 3-D multi-block masks, block shapes, EHR masks."""

from __future__ import annotations

import math

import pytest
import torch

import jepa_lightning.masking as masking
from jepa_lightning.backbones.pooling import center_token_indices
from jepa_lightning.masking import (
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


def test_ehr_groups_are_masked_whole():
    """One attribute's readers (consecutive groups) are all target or all context."""
    tgt, ctx = ehr_token_masks(16, 36, _gen(3), ratio=(0.3, 0.6), group_size=4)
    assert tgt.shape[1] % 4 == 0 and tgt.shape[1] + ctx.shape[1] == 36
    for t, c in zip(tgt, ctx, strict=True):
        assert torch.equal(torch.cat([t, c]).sort().values, torch.arange(36))
        groups_t, groups_c = set((t // 4).tolist()), set((c // 4).tolist())
        assert not groups_t & groups_c
        assert all((t // 4 == g).sum() == 4 for g in groups_t)


def test_ehr_group_size_one_draws_what_single_features_drew():
    a = ehr_token_masks(4, 12, _gen(1), group_size=1)
    b = ehr_token_masks(4, 12, _gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ehr_group_size_must_divide_the_features():
    with pytest.raises(ValueError, match="must divide"):
        ehr_token_masks(2, 10, _gen(0), group_size=4)


def test_lesion_aware_masks_cover_part_of_the_lesion_and_keep_the_rest_in_context():
    grid = (4, 4, 4)
    lesion = center_token_indices(grid, 2)
    targets, context = multiblock_masks(64, grid, _gen(5), scale=(0.1, 0.15), lesion=lesion)
    for tgt, ctx in zip(targets, context, strict=True):
        assert set(tgt.tolist()) & set(lesion.tolist())
        uncovered = set(lesion.tolist()) - set(tgt.tolist())
        assert uncovered and uncovered <= set(ctx.tolist())  # every uncovered lesion patch kept
        assert not set(tgt.tolist()) & set(ctx.tolist())


def test_uniform_masks_often_miss_the_lesion_lesion_aware_never():
    """The reason for the option: uniform blocks leave the lesion out of the targets or out of
    the context in a sizeable share of samples."""
    grid, lesion = (4, 4, 4), center_token_indices((4, 4, 4), 2)

    def missed(**kw):
        targets, context = multiblock_masks(256, grid, _gen(7), scale=(0.1, 0.15), **kw)
        hit_t = torch.isin(targets, lesion).any(1)
        hit_c = torch.isin(context, lesion).any(1)
        return (~(hit_t & hit_c)).float().mean().item()

    assert missed() > 0.1
    assert missed(lesion=lesion) == 0.0
