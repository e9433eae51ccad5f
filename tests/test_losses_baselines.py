"""Unit tests for the baselines' pure pieces: MAE / MSN / InfoNCE losses, patch dropping,
patchify, the MAE decoder."""

from __future__ import annotations

import math

import pytest
import torch

from jepa_lightning.backbones.mae import MAEDecoder, patchify_3d, unpatchify_3d
from jepa_lightning.backbones.vit3d import PatchEmbed3D
from jepa_lightning.losses import (
    clip_loss,
    mae_loss,
    msn_loss,
    normalize_patches,
    prototype_probabilities,
    sharpen,
)
from jepa_lightning.masking import focal_masks, random_masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- MAE


def test_normalize_patches_hand_computed():
    # mean 2, unbiased variance 1 -> (-1, 0, 1)
    out = normalize_patches(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-5)


def test_mae_loss_scores_masked_patches_only():
    patches = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]])
    pred = torch.tensor([[[0.0, 0.0], [4.0, 6.0]]])
    # per-patch MSE: patch 0 (1 + 9) / 2 = 5, patch 1 (1 + 1) / 2 = 1
    only_first = torch.tensor([[True, False]])
    assert mae_loss(pred, patches, only_first, norm_pix=False).item() == pytest.approx(5.0)
    both = torch.tensor([[True, True]])
    assert mae_loss(pred, patches, both, norm_pix=False).item() == pytest.approx(3.0)
    # normalised target of patch 0: (1, 3) -> mean 2, var 2 -> (-1/sqrt2, 1/sqrt2); pred 0 -> 0.5
    assert mae_loss(pred, patches, only_first, norm_pix=True).item() == pytest.approx(0.5, abs=1e-5)
    none = torch.zeros(1, 2, dtype=torch.bool)
    pred.requires_grad_(True)
    zero = mae_loss(pred, patches, none)
    assert zero.item() == 0.0 and zero.requires_grad


def test_patchify_matches_patch_embed_order_and_round_trips():
    patch, grid = (2, 4, 2), (3, 2, 4)
    vol = torch.randn(2, 1, 6, 8, 8, generator=_gen(0))
    patches = patchify_3d(vol, patch)
    assert patches.shape == (2, 24, 16)
    assert torch.equal(unpatchify_3d(patches, grid, patch), vol)
    # token n of PatchEmbed3D (sum filter) == sum of patchify's patch n
    embed = PatchEmbed3D(patch, 1, 1)
    with torch.no_grad():
        embed.proj.weight.fill_(1.0)
        embed.proj.bias.zero_()
        tokens = embed(vol)[..., 0]
    assert torch.allclose(tokens, patches.sum(-1), atol=1e-5)


def test_patchify_refuses_untiled_volume():
    with pytest.raises(ValueError, match="not tiled"):
        patchify_3d(torch.zeros(1, 1, 6, 8, 8), 4)


def test_mae_decoder_places_visible_tokens_at_their_positions():
    dec = MAEDecoder((2, 2, 2), embed_dim=8, patch_voxels=5, decoder_dim=8, depth=1, num_heads=2)
    keep = torch.tensor([[0, 5], [3, 7]])
    visible = torch.randn(2, 2, 8, generator=_gen(1))
    out = dec(visible, keep)
    assert out.shape == (2, 8, 5)
    # with no blocks the output at a position depends only on that position's input
    dec.blocks = torch.nn.ModuleList()
    base = dec(visible, keep)
    moved = visible.clone()
    moved[0, 1] += 1.0  # token kept at position 5 of sample 0
    diff = (dec(moved, keep) - base).abs().sum(-1)
    assert diff[0, 5] > 0 and diff[0].sum() == diff[0, 5] and diff[1].sum() == 0


# --------------------------------------------------------------------------- masks


def test_random_masks_keep_and_mask_are_complements():
    keep, masked = random_masks(4, 64, 16, generator=_gen(0))
    assert keep.shape == (4, 16) and masked.shape == (4, 64)
    for b in range(4):
        assert torch.equal(keep[b], keep[b].sort().values)
        assert keep[b].unique().numel() == 16
        assert not masked[b, keep[b]].any() and masked[b].sum() == 48
    with pytest.raises(ValueError, match="n_keep"):
        random_masks(1, 8, 0)


def test_random_masks_are_uniform_over_positions():
    keep, _ = random_masks(4000, 8, 2, generator=_gen(1))
    freq = torch.bincount(keep.reshape(-1), minlength=8).float() / 4000
    assert torch.allclose(freq, torch.full((8,), 0.25), atol=0.03)


def test_focal_masks_are_contiguous_blocks_reaching_every_corner():
    grid, block = (3, 4, 4), (2, 2, 3)
    keep = focal_masks(500, grid, block, generator=_gen(2))
    assert keep.shape == (500, 12)
    z, y, x = keep // 16, (keep // 4) % 4, keep % 4
    for coord, b in ((z, 2), (y, 2), (x, 3)):
        span = coord.max(1).values - coord.min(1).values
        assert (span == b - 1).all()
    assert (keep == 47).any(1).any() and (keep == 0).any(1).any()  # last and first patch
    with pytest.raises(ValueError, match="does not fit"):
        focal_masks(1, grid, (4, 1, 1))


# --------------------------------------------------------------------------- MSN


def test_prototype_probabilities_hand_computed():
    z = torch.tensor([[2.0, 0.0]])  # cosine, so the norm does not matter
    protos = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    e = math.e
    p = prototype_probabilities(z, protos, temperature=1.0)
    assert torch.allclose(p, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    p = prototype_probabilities(z, protos, temperature=0.5)
    assert torch.allclose(p, torch.tensor([[e**2 / (e**2 + 1), 1 / (e**2 + 1)]]))


def test_sharpen_hand_computed():
    p = sharpen(torch.tensor([[0.5, 0.25, 0.25]]), temperature=0.5)
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))
    assert torch.allclose(sharpen(torch.tensor([[0.3, 0.7]]), 1.0), torch.tensor([[0.3, 0.7]]))


def test_msn_loss_hand_computed():
    anchors = torch.tensor([[0.5, 0.5], [0.8, 0.2]])  # B = 1, M = 2 views
    target = torch.tensor([[1.0, 0.0]])
    ce = (-math.log(0.5) - math.log(0.8)) / 2
    entropy = -(0.65 * math.log(0.65) + 0.35 * math.log(0.35))
    loss, got_ce, got_h = msn_loss(anchors, target, me_max_weight=2.0)
    assert got_ce.item() == pytest.approx(ce, abs=1e-6)
    assert got_h.item() == pytest.approx(entropy, abs=1e-6)
    assert loss.item() == pytest.approx(ce - 2.0 * entropy, abs=1e-6)


def test_msn_loss_anchors_are_view_major_and_target_gets_no_gradient():
    target = torch.tensor([[0.9, 0.1], [0.1, 0.9]], requires_grad=True)
    # view 0 (sample 0, sample 1), then view 1 (sample 0, sample 1): each matches its target
    matched = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]], requires_grad=True)
    sample_major = matched[[0, 2, 1, 3]].detach()  # (s0 v0, s0 v1, s1 v0, s1 v1): wrong order
    loss, ce, _ = msn_loss(matched, target, me_max_weight=0.0)
    _, ce_wrong, _ = msn_loss(sample_major.clone().requires_grad_(True), target, 0.0)
    assert ce.item() < ce_wrong.item()
    loss.backward()
    assert target.grad is None and matched.grad is not None
    with pytest.raises(ValueError, match="not a multiple"):
        msn_loss(torch.full((3, 2), 0.5), torch.full((2, 2), 0.5))


def test_msn_me_max_rewards_using_every_prototype():
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    one_proto = torch.tensor([[0.99, 0.01], [0.99, 0.01]])
    spread = torch.tensor([[0.99, 0.01], [0.01, 0.99]])
    assert msn_loss(spread, target)[2] > msn_loss(one_proto, target)[2]


# --------------------------------------------------------------------------- CLIP


def test_clip_loss_hand_computed():
    eye = torch.eye(2)
    for s in (1.0, 5.0):
        # logits = s * I: each row's cross-entropy is log(1 + e^{-s}), both directions alike
        loss = clip_loss(eye, eye, torch.tensor(s))
        assert loss.item() == pytest.approx(math.log(1 + math.exp(-s)), abs=1e-6)
    swapped = clip_loss(eye, eye.flip(0), torch.tensor(5.0))
    assert swapped.item() == pytest.approx(math.log(1 + math.exp(5.0)), abs=1e-5)


def test_clip_loss_is_symmetric_scale_invariant_and_trains_temperature():
    img = torch.randn(6, 4, generator=_gen(3))
    ehr = torch.randn(6, 4, generator=_gen(4))
    scale = torch.tensor(3.0, requires_grad=True)
    a = clip_loss(img, ehr, scale)
    assert a.item() == pytest.approx(clip_loss(ehr, img, scale).item(), abs=1e-6)
    assert a.item() == pytest.approx(clip_loss(7 * img, ehr, scale).item(), abs=1e-5)
    a.backward()
    assert scale.grad is not None and scale.grad != 0
    assert clip_loss(img[:1], ehr[:1], scale).item() == 0.0
