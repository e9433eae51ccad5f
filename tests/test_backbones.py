"""Unit tests for the backbones: 3-D ViT, EHR tokenizer, multimodal encoder, predictor."""

from __future__ import annotations

import math

import pytest
import torch

from jepa_lightning.backbones import (
    EHRTokenizer,
    JEPAPredictor,
    MultimodalEncoder,
    VisionTransformer3D,
)
from jepa_lightning.backbones.vit3d import as_size3, patch_grid, sincos_pos_embed_3d

IMG = (16, 24, 32)
PATCH = 8
GRID = (2, 3, 4)
N = math.prod(GRID)
DIM = 48
F_EHR = 7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vit(**kw) -> VisionTransformer3D:
    torch.manual_seed(kw.pop("seed", 0))
    return VisionTransformer3D(IMG, PATCH, 1, DIM, depth=2, num_heads=4, **kw).eval()


def _encoder(**kw) -> MultimodalEncoder:
    torch.manual_seed(0)
    arch = {"patch_size": PATCH, "embed_dim": DIM, "depth": 2, "num_heads": 4}
    enc = MultimodalEncoder(image_size=IMG, n_ehr_features=F_EHR, backbone=arch, **kw).eval()
    # Give the EHR value path some magnitude (biases start at zero, weights at std 0.02).
    with torch.no_grad():
        enc.ehr.value_bias.normal_(0, 0.02, generator=_gen(99))
    return enc


def _volume(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 1, *IMG, generator=_gen(seed))


def _voxel_patch_ids() -> torch.Tensor:
    """[D, H, W] raster index of the patch each voxel belongs to."""
    ids = torch.arange(N).reshape(GRID)
    for axis in range(3):
        ids = ids.repeat_interleave(PATCH, dim=axis)
    return ids


def _keep(batch: int, k: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.stack([torch.randperm(N, generator=g)[:k].sort().values for _ in range(batch)])


def _scramble_dropped(x: torch.Tensor, keep: torch.Tensor, seed: int) -> torch.Tensor:
    """Replace the voxels of every patch not in keep[b] by large random values."""
    ids = _voxel_patch_ids()
    out = x.clone()
    g = _gen(seed)
    for b in range(x.shape[0]):
        dropped = ~torch.isin(ids, keep[b])
        assert dropped.any()
        out[b, :, dropped] = torch.randn(int(dropped.sum()), generator=g) * 100 + 7
    return out


def _perturb_patch(x: torch.Tensor, b: int, patch: int) -> torch.Tensor:
    out = x.clone()
    out[b, :, _voxel_patch_ids() == patch] += 3.0
    return out


# --------------------------------------------------------------------------- positions, grid


def test_sincos_pos_embed_3d_shape_and_distinct_rows():
    pe = sincos_pos_embed_3d((2, 3, 4), 96)
    assert pe.shape == (24, 96) and pe.dtype == torch.float32
    d = torch.cdist(pe, pe)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > 1e-3


def test_sincos_pos_embed_3d_axes_are_coded_separately():
    grid, dim = (2, 3, 4), 96
    pe = sincos_pos_embed_3d(grid, dim).reshape(*grid, dim)
    per_axis = 2 * (dim // 6)
    z_part, y_part, x_part = pe.split([dim - 2 * per_axis, per_axis, per_axis], dim=-1)
    # each channel block depends on its own axis only
    assert torch.allclose(z_part, z_part[:, :1, :1].expand_as(z_part))
    assert torch.allclose(y_part, y_part[:1, :, :1].expand_as(y_part))
    assert torch.allclose(x_part, x_part[:1, :1, :].expand_as(x_part))
    # and differs between positions along that axis
    assert not torch.allclose(z_part[0], z_part[1])
    assert not torch.allclose(x_part[:, :, 0], x_part[:, :, 3])


@pytest.mark.parametrize("dim", [4, 7, 0])
def test_sincos_pos_embed_3d_rejects_small_or_odd_dim(dim):
    with pytest.raises(ValueError):
        sincos_pos_embed_3d((2, 2, 2), dim)


def test_sincos_pos_embed_3d_smallest_dims():
    assert sincos_pos_embed_3d((2, 2, 2), 6).shape == (8, 6)
    assert sincos_pos_embed_3d((2, 2, 2), 10).shape == (8, 10)


def test_patch_grid():
    assert patch_grid(IMG, PATCH) == GRID
    assert patch_grid(32, [8, 4, 16]) == (4, 8, 2)


@pytest.mark.parametrize(
    "img, axis", [((15, 24, 32), "axis D"), ((16, 20, 32), "axis H"), ((16, 24, 30), "axis W")]
)
def test_patch_grid_rejects_non_divisible(img, axis):
    with pytest.raises(ValueError, match=axis):
        patch_grid(img, 8)


def test_as_size3_rejects_wrong_length():
    assert as_size3(4) == (4, 4, 4)
    with pytest.raises(ValueError):
        as_size3([4, 4])


# --------------------------------------------------------------------------- ViT


def test_vit_shapes_non_cubic():
    vit = _vit()
    assert vit.grid == GRID and vit.num_patches == N
    x = _volume(2, 0)
    out = vit(x)
    assert out.shape == (2, N, DIM)
    keep = _keep(2, 9, 1)
    assert vit(x, keep).shape == (2, 9, DIM)
    assert torch.isfinite(out).all()


def test_vit_rejects_wrong_volume_size():
    with pytest.raises(ValueError, match="image_size"):
        _vit()(torch.zeros(1, 1, 16, 24, 24))


def test_vit_keep_equals_gathered_positions_not_full_sequence():
    """Keeping every token in a shuffled order gives the full output, shuffled (the encoder is
    permutation-equivariant once positions are added), while a strict subset differs from the
    corresponding rows of the full pass (the dropped tokens are really gone)."""
    vit = _vit()
    x = _volume(1, 2)
    with torch.no_grad():
        full = vit(x)
        perm = torch.randperm(N, generator=_gen(3))[None]
        assert torch.allclose(vit(x, perm), full[:, perm[0]], atol=1e-5)
        keep = _keep(1, 6, 4)
        assert not torch.allclose(vit(x, keep), full[:, keep[0]], atol=1e-3)


def test_vit_dropped_voxels_cannot_reach_output():
    vit = _vit()
    x = _volume(3, 5)
    keep = _keep(3, 10, 6)
    with torch.no_grad():
        ref = vit(x, keep)
        scrambled = vit(_scramble_dropped(x, keep, 7), keep)
        assert torch.allclose(ref, scrambled, atol=1e-6, rtol=0)
        # positive control: a kept patch's voxels do reach the output
        moved = vit(_perturb_patch(x, 1, int(keep[1, 3])), keep)
    assert (moved[1] - ref[1]).abs().max() > 1e-3
    assert torch.allclose(moved[0], ref[0], atol=1e-6) and torch.allclose(
        moved[2], ref[2], atol=1e-6
    )


def test_encoder_dropped_voxels_and_ehr_cannot_reach_output():
    enc = _encoder()
    b = 3
    x = _volume(b, 8)
    g = _gen(9)
    ehr = torch.randn(b, F_EHR, generator=g)
    ehr[0, 2] = float("nan")
    missing = torch.zeros(b, F_EHR, dtype=torch.bool)
    missing[1, 4] = True
    image_keep = _keep(b, 8, 10)
    ehr_keep = torch.stack([torch.randperm(F_EHR, generator=g)[:3].sort().values for _ in range(b)])
    with torch.no_grad():
        ref = enc(x, ehr, missing, image_keep, ehr_keep)
        assert ref.shape == (b, 8 + 3, DIM)
        # scramble every dropped voxel, every dropped EHR value, flip dropped missing flags
        ehr2, missing2 = ehr.clone(), missing.clone()
        for i in range(b):
            dropped = ~torch.isin(torch.arange(F_EHR), ehr_keep[i])
            ehr2[i, dropped] = torch.randn(int(dropped.sum()), generator=g) * 50
            ehr2[i, dropped.nonzero()[0]] = float("nan")
            missing2[i, dropped] = ~missing2[i, dropped]
        out = enc(_scramble_dropped(x, image_keep, 11), ehr2, missing2, image_keep, ehr_keep)
        assert torch.allclose(ref, out, atol=1e-6, rtol=0)

        # positive controls: a kept EHR value, or a kept patch, changes the output
        ehr3 = ehr.clone()
        f = int(ehr_keep[2, 0])
        ehr3[2, f] = (0.0 if torch.isnan(ehr3[2, f]) else ehr3[2, f]) + 5.0
        missing3 = missing.clone()
        missing3[2, f] = False
        moved_ehr = enc(x, ehr3, missing3, image_keep, ehr_keep)
        moved_img = enc(
            _perturb_patch(x, 0, int(image_keep[0, 0])), ehr, missing, image_keep, ehr_keep
        )
    assert (moved_ehr[2] - ref[2]).abs().max() > 1e-4
    assert torch.allclose(moved_ehr[:2], ref[:2], atol=1e-6)
    assert (moved_img[0] - ref[0]).abs().max() > 1e-3


def test_encoder_token_counts():
    enc = _encoder()
    x = _volume(2, 12)
    ehr = torch.randn(2, F_EHR, generator=_gen(13))
    with torch.no_grad():
        assert enc(image=x).shape == (2, N, DIM)
        assert enc(ehr=ehr).shape == (2, F_EHR, DIM)
        both = enc(x, ehr)
        assert both.shape == (2, N + F_EHR, DIM)
        # zero-column keep drops that modality entirely
        empty = torch.zeros(2, 0, dtype=torch.long)
        assert enc(x, ehr, image_keep=empty).shape == (2, F_EHR, DIM)
        assert enc(x, ehr, ehr_keep=empty).shape == (2, N, DIM)
    assert enc.grid == GRID and enc.num_patches == N and enc.n_ehr_features == F_EHR


def test_encoder_image_tokens_come_first():
    enc = _encoder()
    x = _volume(1, 14)
    ehr = torch.randn(1, F_EHR, generator=_gen(15))
    with torch.no_grad():
        tokens = enc.tokens(x, ehr)
        img_only = enc.tokens(image=x)
        ehr_only = enc.tokens(ehr=ehr)
    assert torch.allclose(tokens[:, :N], img_only) and torch.allclose(tokens[:, N:], ehr_only)


def test_encoder_rejects_no_input():
    enc = _encoder()
    with pytest.raises(ValueError):
        enc()
    with pytest.raises(ValueError):
        enc(image=_volume(1, 0), image_keep=torch.zeros(1, 0, dtype=torch.long))


# --------------------------------------------------------------------------- EHR tokenizer


def _tokenizer() -> EHRTokenizer:
    torch.manual_seed(0)
    tok = EHRTokenizer(5, 16)
    with torch.no_grad():
        tok.value_bias.normal_(0, 0.1, generator=_gen(1))
    return tok


def test_ehr_nan_and_missing_flag_give_missing_embedding():
    tok = _tokenizer()
    v_nan = torch.tensor([[0.3, float("nan"), -1.0, 2.0, 0.0]])
    v_flag = torch.tensor([[0.3, 4.2, -1.0, 2.0, 0.0]])
    flag = torch.tensor([[False, True, False, False, False]])
    a, b = tok(v_nan), tok(v_flag, flag)
    assert torch.allclose(a, b)
    expected = tok.missing_embed[1] + tok.identity[1]
    assert torch.allclose(a[0, 1], expected)
    # a missing token is not the token of the value 0 (missing is not imputed as 0)
    zero = tok(torch.tensor([[0.3, 0.0, -1.0, 2.0, 0.0]]))
    assert not torch.allclose(a[0, 1], zero[0, 1])


def test_ehr_missing_token_does_not_depend_on_value():
    tok = _tokenizer()
    flag = torch.tensor([[True, False, False, False, True]]).expand(3, -1)
    values = torch.randn(3, 5, generator=_gen(2)) * 10
    out = tok(values, flag)
    assert torch.allclose(out[:, 0], out[:1, 0].expand(3, -1))
    assert torch.allclose(out[:, 4], out[:1, 4].expand(3, -1))
    # positive control: observed features do depend on their value
    assert not torch.allclose(out[0, 2], out[1, 2])
    assert out.shape == (3, 5, 16)


def test_ehr_nan_inputs_give_finite_tokens_and_gradients():
    tok = _tokenizer()
    values = torch.randn(4, 5, generator=_gen(3))
    values[0, 0] = values[2, 3] = values[3, 4] = float("nan")
    out = tok(values, torch.zeros(4, 5))
    assert torch.isfinite(out).all()
    (out**2).sum().backward()
    for name, p in tok.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ehr_rejects_wrong_feature_count():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="n_ehr_features"):
        tok(torch.zeros(2, 6))
    with pytest.raises(ValueError):
        EHRTokenizer(0, 8)


# --------------------------------------------------------------------------- predictor


def _predictor() -> JEPAPredictor:
    torch.manual_seed(0)
    return JEPAPredictor(GRID, F_EHR, DIM, predictor_dim=24, depth=2, num_heads=4).eval()


@pytest.mark.parametrize(
    "n_ctx_img, n_ctx_ehr, n_tgt_img, n_tgt_ehr",
    [(6, 3, 8, 4), (6, 0, 8, 0), (0, F_EHR, 10, 0), (9, 0, 5, F_EHR), (3, 2, 0, 5)],
)
def test_predictor_output_shapes(n_ctx_img, n_ctx_ehr, n_tgt_img, n_tgt_ehr):
    pred = _predictor()
    b = 2
    g = _gen(4)

    def idx(k, n):
        return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])

    context = torch.randn(b, n_ctx_img + n_ctx_ehr, DIM, generator=g)
    with torch.no_grad():
        out_img, out_ehr = pred(
            context,
            idx(n_ctx_img, N),
            idx(n_ctx_ehr, F_EHR),
            idx(n_tgt_img, N),
            idx(n_tgt_ehr, F_EHR),
        )
    assert out_img.shape == (b, n_tgt_img, DIM)
    assert out_ehr.shape == (b, n_tgt_ehr, DIM)
    assert torch.isfinite(out_img).all() and torch.isfinite(out_ehr).all()


def test_predictor_targets_depend_on_position():
    pred = _predictor()
    context = torch.randn(1, 4, DIM, generator=_gen(5))
    ctx_img = torch.tensor([[0, 5, 9, 20]])
    no_ehr = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        out, _ = pred(context, ctx_img, no_ehr, torch.tensor([[1, 2, 23]]), no_ehr)
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)
    assert not torch.allclose(out[0, 1], out[0, 2], atol=1e-4)


def test_predictor_rejects_context_length_mismatch():
    pred = _predictor()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        pred(torch.randn(1, 4, DIM), idx, torch.zeros(1, 0, dtype=torch.long), idx, idx)


# --------------------------------------------------------------------------- checkpointing


def test_grad_checkpointing_gives_same_gradients():
    plain = _vit(grad_checkpointing=False).train()
    ckpt = _vit(grad_checkpointing=True, seed=123).train()
    ckpt.load_state_dict(plain.state_dict())
    x = _volume(2, 16)
    keep = _keep(2, 12, 17)
    target = torch.randn(2, 12, DIM, generator=_gen(18))

    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    # a pre-hook: non-reentrant recomputation may stop before the block's forward returns
    handles = [m.blocks[0].register_forward_pre_hook(count) for m in (plain, ckpt)]
    grads = []
    for i, model in enumerate((plain, ckpt)):
        calls["n"] = 0
        xi = x.clone().requires_grad_(True)
        ((model(xi, keep) - target) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()} | {"x": xi.grad})
        # checkpointing recomputes the block during backward: the test really exercises it
        assert calls["n"] == (2 if i == 1 else 1)
    for h in handles:
        h.remove()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_grad_checkpointing_only_when_training_with_grad(monkeypatch):
    vit = _vit(grad_checkpointing=True)
    ref = _vit()  # same seed, same weights, no checkpointing
    x = _volume(1, 19)
    used = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        used["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    with torch.no_grad():
        assert torch.allclose(vit.train()(x), ref.train()(x), atol=1e-6)
    assert torch.allclose(vit.eval()(x), ref.eval()(x), atol=1e-6)
    assert used["n"] == 0
    out = vit.train()(x)
    assert used["n"] == len(vit.blocks)
    assert torch.allclose(out, ref.train()(x), atol=1e-6)


# --------------------------------------------------------------------------- pooling


def test_center_pooling_keeps_the_central_block_and_the_ehr_tokens():
    from jepa_lightning.backbones.pooling import center_token_indices, pool_tokens

    idx = center_token_indices((4, 4, 4), 2)
    expected = [z * 16 + y * 4 + x for z in (1, 2) for y in (1, 2) for x in (1, 2)]
    assert idx.tolist() == expected
    assert center_token_indices((3, 4, 1), 2).tolist() == [
        0 * 4 + 1,
        0 * 4 + 2,
        1 * 4 + 1,
        1 * 4 + 2,
    ]
    tokens = torch.randn(2, 64 + 3, 5)
    pooled = pool_tokens(tokens, 64, (4, 4, 4), "center")
    kept = torch.cat([tokens[:, expected], tokens[:, 64:]], 1).mean(1)
    assert torch.allclose(pooled, kept)
    assert torch.allclose(pool_tokens(tokens, 64, (4, 4, 4), "mean"), tokens.mean(1))
    assert torch.allclose(
        pool_tokens(tokens[:, 64:], 0, (4, 4, 4), "center"), tokens[:, 64:].mean(1)
    )
    with pytest.raises(ValueError, match="every image token"):
        pool_tokens(tokens[:, :10], 10, (4, 4, 4), "center")
    with pytest.raises(ValueError, match="pooling must be"):
        pool_tokens(tokens, 64, (4, 4, 4), "max")
