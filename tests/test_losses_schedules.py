"""Unit tests for losses, schedules, EMA, collapse diagnostics and optimizer decay groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_lightning.backbones import JEPAPredictor, MultimodalEncoder
from jepa_lightning.collapse import (
    centred_rank,
    collapse_measures,
    collapse_verdict,
    mean_feature_std,
    rankme,
    spread_share,
)
from jepa_lightning.losses import (
    latent_regression_loss,
    layer_norm_targets,
    masked_bce_with_logits,
)
from jepa_lightning.schedules import ema_momentum, ema_update_, warmup_cosine
from jepa_lightning.tasks.base import decay_groups, is_no_decay


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- latent regression


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "l2"])
def test_latent_loss_zero_for_identical_inputs(kind):
    x = torch.randn(2, 5, 8, generator=_gen(0))
    assert latent_regression_loss(x, x.clone(), kind=kind).item() == 0.0
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.0, 1.0]])
    assert latent_regression_loss(x, x.clone(), w, kind=kind).item() == 0.0


# pred - target differences per element: token 0 -> [0.5, -2.0], token 1 -> [0.0, 1.0]
_PRED = torch.tensor([[[0.5, 0.0], [1.0, 3.0]]])
_TARGET = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])


@pytest.mark.parametrize(
    "kind, beta, per_token",
    [
        # smooth_l1, beta 1: |d|<1 -> 0.5 d^2, else |d| - 0.5
        ("smooth_l1", 1.0, [(0.125 + 1.5) / 2, (0.0 + 0.5) / 2]),
        # smooth_l1, beta 4: every |d| < 4 -> 0.5 d^2 / 4
        ("smooth_l1", 4.0, [(0.03125 + 0.5) / 2, (0.0 + 0.125) / 2]),
        ("l1", 1.0, [(0.5 + 2.0) / 2, (0.0 + 1.0) / 2]),
        ("l2", 1.0, [(0.25 + 4.0) / 2, (0.0 + 1.0) / 2]),
    ],
)
def test_latent_loss_hand_computed(kind, beta, per_token):
    loss = latent_regression_loss(_PRED, _TARGET, kind=kind, beta=beta)
    assert loss.item() == pytest.approx(sum(per_token) / 2, abs=1e-6)
    # weights: a weighted mean of the per-token means
    w = torch.tensor([[3.0, 1.0]])
    weighted = latent_regression_loss(_PRED, _TARGET, w, kind=kind, beta=beta)
    assert weighted.item() == pytest.approx((3 * per_token[0] + per_token[1]) / 4, abs=1e-6)
    only_second = latent_regression_loss(_PRED, _TARGET, torch.tensor([[0.0, 1.0]]), kind=kind)
    assert only_second.item() == pytest.approx(
        latent_regression_loss(_PRED[:, 1:], _TARGET[:, 1:], kind=kind).item(), abs=1e-7
    )


def test_latent_loss_ignores_zero_weight_tokens():
    g = _gen(1)
    pred = torch.randn(2, 4, 6, generator=g)
    target = torch.randn(2, 4, 6, generator=g)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    base = latent_regression_loss(pred, target, w)
    changed = pred.clone()
    changed[0, 1] += 100.0
    changed[1, 2] = torch.randn(6, generator=g) * 50
    assert latent_regression_loss(changed, target, w).item() == pytest.approx(base.item(), abs=1e-6)
    # positive control: a weighted token does move the loss
    changed[0, 0] += 5.0
    assert abs(latent_regression_loss(changed, target, w).item() - base.item()) > 1e-2
    # and gradient never reaches the zero-weight tokens
    p = pred.clone().requires_grad_(True)
    latent_regression_loss(p, target, w).backward()
    assert torch.all(p.grad[0, 1] == 0) and torch.all(p.grad[1, 2] == 0)
    assert p.grad[0, 0].abs().sum() > 0


def test_latent_loss_all_zero_weights_is_zero_and_differentiable():
    g = _gen(2)
    pred = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 4, generator=g)
    loss = latent_regression_loss(pred, target, torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_latent_loss_empty_targets_is_zero_and_differentiable():
    pred = torch.randn(2, 0, 4, requires_grad=True)
    loss = latent_regression_loss(pred, torch.randn(2, 0, 4))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert pred.grad is not None


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "l2"])
def test_latent_loss_runs_in_fp32_for_bf16_inputs(kind):
    g = _gen(3)
    pred = torch.randn(2, 5, 16, generator=g).bfloat16()
    target = torch.randn(2, 5, 16, generator=g).bfloat16()
    w = torch.tensor([[1.0, 1, 0, 1, 1], [0, 1, 1, 1, 1]]).bfloat16()
    loss = latent_regression_loss(pred, target, w, kind=kind)
    assert loss.dtype == torch.float32
    ref = latent_regression_loss(pred.float(), target.float(), w.float(), kind=kind)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert latent_regression_loss(pred, target, kind=kind).dtype == torch.float32


def test_latent_loss_unknown_kind():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="huber"):
        latent_regression_loss(x, x, kind="huber")


# --------------------------------------------------------------------------- targets, BCE


def test_layer_norm_targets():
    g = _gen(4)
    hidden = (torch.randn(3, 7, 32, generator=g) * 5 + 3).bfloat16()
    out = layer_norm_targets(hidden)
    assert out.dtype == torch.float32 and out.shape == hidden.shape
    assert torch.allclose(out.mean(-1), torch.zeros(3, 7), atol=1e-5)
    assert torch.allclose(out.std(-1, unbiased=False), torch.ones(3, 7), atol=1e-3)
    # no learnable affine: per-token normalisation of the fp32 input, nothing else
    h = hidden.float()
    ref = (h - h.mean(-1, keepdim=True)) / torch.sqrt(
        h.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    assert torch.allclose(out, ref, atol=1e-5)


def test_masked_bce_ignores_nan_labels():
    g = _gen(5)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (6, 4), generator=g).float()
    labels[0, 1] = labels[2, 0] = labels[5, 3] = labels[3, 2] = float("nan")
    loss = masked_bce_with_logits(logits, labels)
    keep = ~torch.isnan(labels)
    ref = F.binary_cross_entropy_with_logits(logits[keep], labels[keep])
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[~keep] == 0)
    assert torch.all(logits.grad[keep] != 0)


def test_masked_bce_all_nan_is_zero():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.full((3, 2), float("nan")))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_masked_bce_fp32_for_bf16_logits():
    logits = torch.randn(4, 3, generator=_gen(6)).bfloat16()
    labels = torch.tensor([[1.0, 0, float("nan")]] * 4)
    assert masked_bce_with_logits(logits, labels).dtype == torch.float32


# --------------------------------------------------------------------------- schedules


def test_warmup_cosine():
    warmup, total, min_ratio = 10, 100, 0.05
    values = [warmup_cosine(s, warmup, total, min_ratio) for s in range(total + 1)]
    assert 0 < values[0] <= 1 / warmup + 1e-12
    assert values[warmup - 1] == pytest.approx(1.0)
    assert values[warmup] == pytest.approx(1.0)
    assert values[total] == pytest.approx(min_ratio)
    warm = values[:warmup]
    assert all(b > a for a, b in zip(warm, warm[1:], strict=False))
    decay = values[warmup:]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
    # cosine midpoint
    assert values[warmup + (total - warmup) // 2] == pytest.approx((1 + min_ratio) / 2)
    # clamps past the end
    assert warmup_cosine(total + 50, warmup, total, min_ratio) == pytest.approx(min_ratio)
    # no warmup: starts at the peak
    assert warmup_cosine(0, 0, total) == pytest.approx(1.0)


def test_ema_momentum():
    start, end, total = 0.99, 1.0, 200
    assert ema_momentum(0, total, start, end) == pytest.approx(start)
    assert ema_momentum(total, total, start, end) == pytest.approx(end)
    assert ema_momentum(total // 2, total, start, end) == pytest.approx((start + end) / 2)
    assert ema_momentum(50, total, start, end) == pytest.approx(start + 0.25 * (end - start))
    assert ema_momentum(10 * total, total, start, end) == pytest.approx(end)
    assert ema_momentum(5, 0, start, end) == end


def test_ema_update_matches_formula():
    g = _gen(7)
    shapes = [(3,), (4, 5), (2, 3, 4)]
    target = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    online = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    before = [t.clone() for t in target]
    m = 0.9
    ema_update_(target, online, m)
    for t, t0, o in zip(target, before, online, strict=True):
        assert torch.allclose(t, m * t0 + (1 - m) * o, rtol=0, atol=1e-12)
        assert not torch.allclose(t, t0)


def test_ema_update_extremes_and_errors():
    g = _gen(8)
    target = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    online = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g)]
    before = [t.clone() for t in target]
    ema_update_(target, online, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before, strict=True))
    ema_update_(target, online, 0.0)
    assert all(torch.allclose(t, o, atol=1e-7) for t, o in zip(target, online, strict=True))
    with pytest.raises(ValueError):
        ema_update_(target, online[:1], 0.5)
    ema_update_([], [], 0.5)  # no parameters: a no-op, not an error


def test_ema_update_on_parameters_without_grad():
    target = [nn.Parameter(torch.zeros(3))]
    online = [nn.Parameter(torch.ones(3))]
    ema_update_(target, online, 0.75)  # no_grad inside: in-place on leaves is allowed
    assert torch.allclose(target[0].detach(), torch.full((3,), 0.25))


# --------------------------------------------------------------------------- collapse


def test_rankme_and_centred_rank_of_a_rank_one_embedding():
    g = _gen(9)
    a, b = torch.randn(500, generator=g), torch.randn(32, generator=g)
    assert rankme(torch.outer(a, b)) == pytest.approx(1.0, abs=0.02)
    assert centred_rank(torch.outer(a, b)) == pytest.approx(1.0, abs=0.02)


def test_rankme_and_centred_rank_of_an_isotropic_embedding():
    c = 16
    z = torch.randn(4000, c, generator=_gen(10))
    assert 0.9 * c < rankme(z) <= c + 1e-3
    assert 0.9 * c < centred_rank(z) <= c + 1e-3


def test_centred_rank_intermediate_and_degenerate():
    g = _gen(11)
    # 4 independent directions embedded in 32 channels
    z = torch.randn(2000, 4, generator=g) @ torch.randn(4, 32, generator=g)
    assert 2.0 < centred_rank(z) < 4.0 + 1e-3
    # a constant offset does not add a dimension to the centred rank
    assert centred_rank(torch.outer(torch.randn(300, generator=g), torch.ones(8)) + 5.0) == (
        pytest.approx(1.0, abs=0.02)
    )
    assert math.isnan(centred_rank(torch.randn(1, 8)))
    assert math.isnan(rankme(torch.randn(1, 8)))


def test_rankme_is_uncentred_and_reads_a_point_collapse_as_one():
    """RankMe (Garrido et al. 2023) from its definition, in float64: p_k = s_k / sum(s) + eps,
    exp(-sum p log p) of the singular values of the *uncentred* embeddings. A collapse to one
    point plus small noise reads ~1 there, while the centred rank reads the noise (~30 of 32),
    so the verdict must come from RankMe or the spread, never the centred rank alone."""
    g = _gen(13)
    point = torch.randn(32, generator=g, dtype=torch.float64) * 3
    z = point + 1e-3 * torch.randn(512, 32, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert rankme(z) == pytest.approx(expected, rel=1e-4)
    assert rankme(z) < 1.1
    assert centred_rank(z) > 25  # the blind spot of the centred statistic
    assert spread_share(z) < 1e-5
    assert collapse_verdict(spread_share(z), centred_rank(z)) == "point collapse"


def test_collapse_verdicts():
    g = _gen(14)
    healthy = torch.randn(400, 16, generator=g)
    line = torch.outer(torch.randn(400, generator=g), torch.randn(16, generator=g))
    assert collapse_verdict(spread_share(healthy), centred_rank(healthy)) == "none"
    assert collapse_verdict(spread_share(line), centred_rank(line)) == "dimensional collapse"
    assert collapse_verdict(float("nan"), 3.0) == "unknown"
    assert set(collapse_measures(healthy)) == {
        "rankme",
        "centred_rank",
        "spread_share",
        "feature_std",
    }


def test_mean_feature_std():
    row = torch.randn(1, 64, generator=_gen(12))
    assert mean_feature_std(row.expand(50, -1).clone()) == pytest.approx(0.0, abs=1e-6)
    # scaling samples changes nothing after L2 normalisation: still collapsed
    scaled = row.expand(50, -1) * torch.rand(50, 1, generator=_gen(13)).add(0.5)
    assert mean_feature_std(scaled) == pytest.approx(0.0, abs=1e-6)
    spread = mean_feature_std(torch.randn(2000, 64, generator=_gen(14)))
    assert spread == pytest.approx(1 / math.sqrt(64), rel=0.05)


# --------------------------------------------------------------------------- decay groups


def test_is_no_decay_rules():
    w2d = torch.zeros(4, 3)
    assert is_no_decay("encoder.ehr.identity", w2d)
    assert is_no_decay("encoder.ehr.missing_embed", w2d)
    assert is_no_decay("encoder.ehr.value_bias", w2d)
    assert is_no_decay("encoder.modality_embed", w2d)
    assert is_no_decay("predictor.mask_token", torch.zeros(8))
    assert is_no_decay("predictor.mask_token", torch.zeros(1, 1, 8))
    assert is_no_decay("blocks.0.norm1.weight", torch.zeros(8))
    assert is_no_decay("blocks.0.attn.qkv.bias", torch.zeros(24))
    assert is_no_decay("head.bias", torch.zeros(2, 2))
    assert not is_no_decay("blocks.0.attn.qkv.weight", w2d)
    assert not is_no_decay("head.weight", w2d)
    assert not is_no_decay("patch_embed.proj.weight", torch.zeros(8, 1, 2, 2, 2))
    # only the last name component counts: a module named 'identity' holding weights decays
    assert not is_no_decay("identity.proj.weight", w2d)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.ehr = nn.Module()
        self.encoder.ehr.identity = nn.Parameter(torch.zeros(5, 8))
        self.predictor = nn.Module()
        self.predictor.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_decay_groups_split():
    model = _Toy()
    groups = decay_groups(model.named_parameters(), weight_decay=0.1, lr_mult=0.5)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr_mult"] == no_decay["lr_mult"] == 0.5
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model.fc.weight)}
    assert ids(no_decay["params"]) == {
        id(model.encoder.ehr.identity),
        id(model.predictor.mask_token),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.fc.bias),
    }
    # frozen parameters are in no group
    all_ids = ids(decay["params"]) | ids(no_decay["params"])
    assert id(model.frozen.weight) not in all_ids and id(model.frozen.bias) not in all_ids


def test_decay_groups_drop_empty_groups():
    norm = nn.LayerNorm(4)
    groups = decay_groups(norm.named_parameters(), 0.05)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert decay_groups([], 0.05) == []


def _real_model_groups():
    model = nn.Module()
    model.encoder = MultimodalEncoder(
        image_size=8,
        n_ehr_features=3,
        backbone={"patch_size": 4, "embed_dim": 12, "depth": 1, "num_heads": 2},
    )
    model.predictor = JEPAPredictor((2, 2, 2), 3, 12, predictor_dim=12, depth=1, num_heads=2)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = decay_groups(model.named_parameters(), 0.05)
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_decay_groups_on_real_encoder():
    decay, no_decay = _real_model_groups()
    for name in (
        "encoder.ehr.identity",
        "encoder.ehr.missing_embed",
        "encoder.ehr.value_bias",
        "encoder.modality_embed",
        "predictor.mask_token",
        "predictor.modality_embed",
        "encoder.vit.norm.weight",
        "encoder.vit.blocks.0.attn.qkv.bias",
    ):
        assert name in no_decay, name
    for name in (
        "encoder.vit.patch_embed.proj.weight",
        "encoder.vit.blocks.0.attn.qkv.weight",
        "encoder.vit.blocks.0.mlp.0.weight",
        "encoder.ehr.value_weight",
        "predictor.input_proj.weight",
        "predictor.output_proj.weight",
    ):
        assert name in decay, name


def test_predictor_feature_identity_code_is_not_decayed():
    """The predictor's own copy of the EHR feature identity (``predictor.ehr_identity``) is
    an embedding code exactly like ``encoder.ehr.identity``: weight decay would erase it."""
    _, no_decay = _real_model_groups()
    assert "predictor.ehr_identity" in no_decay


# ------------------------------------------------------------------------ variance hinge


def test_variance_hinge_penalises_identical_samples_and_not_spread_ones():
    from jepa_lightning.losses import variance_hinge

    same = torch.ones(16, 8, requires_grad=True)
    assert variance_hinge(same).item() == pytest.approx(1 - 1e-2, abs=1e-3)  # sqrt(0 + eps)
    spread = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert variance_hinge(spread).item() == 0.0
    half = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    assert variance_hinge(half).item() == pytest.approx(0.5, abs=0.03)
    variance_hinge(same).backward()  # differentiable even at zero variance
    assert torch.isfinite(same.grad).all()
    assert variance_hinge(torch.ones(1, 8)).item() == 0.0
