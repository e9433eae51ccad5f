"""The JEPA fixes of "A JEPA that learns": SIGReg, position-free targets, per-modality
targets, schedules that fit the run, and the reference monitors."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from jepa_lightning.backbones.vit3d import VisionTransformer3D
from jepa_lightning.losses import (
    center_targets,
    latent_regression_loss,
    layer_norm_targets,
    position_r2,
    sigreg,
    sigreg_directions,
)
from jepa_lightning.schedules import (
    cosine_ramp,
    ema_init_share,
    ema_momentum,
    ema_start_for_share,
    warmup_stable_decay,
)
from jepa_lightning.tasks import MultimodalJEPA
from jepa_lightning.tasks.probe import SyncedStandardize
from jepa_lightning.tasks.references import offline_probe_auroc

DIRS = sigreg_directions(32, 64, seed=0)

# ------------------------------------------------------------------------------- SIGReg


def test_sigreg_small_for_gaussian_large_for_collapse():
    g = torch.Generator().manual_seed(1)
    gauss = sigreg(torch.randn(512, 32, generator=g), DIRS)
    constant = sigreg(torch.zeros(512, 32), DIRS)
    rank_one = sigreg(torch.randn(512, 1, generator=g) * torch.ones(1, 32), DIRS)
    shrunk = sigreg(0.05 * torch.randn(512, 32, generator=g), DIRS)
    assert gauss < 3.0
    assert constant > 50 * gauss and shrunk > 50 * gauss and rank_one > 10 * gauss


def test_sigreg_gradient_pushes_a_collapsed_batch_apart():
    z = (0.01 * torch.randn(256, 32, generator=torch.Generator().manual_seed(2))).requires_grad_()
    opt = torch.optim.SGD([z], lr=1.0)
    before = float(z.detach().std(0).mean())
    for _ in range(100):
        opt.zero_grad()
        sigreg(z, DIRS).backward()
        opt.step()
    assert float(z.detach().std(0).mean()) > 20 * before


def test_sigreg_directions_are_unit_and_keyed_on_the_seed():
    assert torch.allclose(DIRS.norm(dim=0), torch.ones(64))
    assert torch.equal(DIRS, sigreg_directions(32, 64, seed=0))
    assert not torch.equal(DIRS, sigreg_directions(32, 64, seed=1))


def test_sigreg_of_split_batch_with_summed_statistics_equals_whole_batch():
    """Two 'ranks' each holding half the batch: summing their cos/sin sums and counts (what
    the all-reduce does) gives exactly the one-process value."""
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    whole = sigreg(z, DIRS)
    halves = (z[:40], z[40:])
    captured: list[torch.Tensor] = []

    def fake_reduce(rank_half: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            captured.append(x)
            return x  # replaced below by the sum of both halves' statistics

        return reduce

    # statistics of each half, then the sum over halves fed back to each
    stats = []
    for h in halves:
        captured.clear()
        sigreg(h, DIRS, reduce_sum=fake_reduce(0))
        stats.append([c.clone() for c in captured])
    summed = [stats[0][i] + stats[1][i] for i in range(2)]
    values = []
    for h in halves:
        it = iter(summed)
        values.append(sigreg(h, DIRS, reduce_sum=lambda x, it=it: next(it)))
    assert torch.allclose(values[0], whole, rtol=1e-5) and torch.allclose(
        values[1], whole, rtol=1e-5
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_sigreg(rank: int, port: int, z: torch.Tensor, out: dict, standardize: bool) -> None:
    import torch.distributed as dist

    from jepa_lightning.distributed import all_reduce_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = z[rank::2].clone().requires_grad_()
        value = sigreg(local, DIRS, reduce_sum=all_reduce_sum, standardize=standardize)
        value.backward()
        out[rank] = (float(value), local.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("standardize", [False, True])
def test_sigreg_two_gloo_ranks_equal_one_process(standardize):
    """Real 2-process gloo: each rank's value is the whole batch's, and the gradients (summed
    by the all-reduce's backward, then averaged by DDP: x 1/2) are the whole batch's; also
    with the batch moments of ``standardize`` reduced over ranks."""
    z = torch.randn(48, 32, generator=torch.Generator().manual_seed(4))
    whole = z.clone().requires_grad_()
    expected = sigreg(whole, DIRS, standardize=standardize)
    expected.backward()
    out = mp.Manager().dict()
    mp.spawn(_two_rank_sigreg, args=(_free_port(), z, out, standardize), nprocs=2, join=True)
    for rank in (0, 1):
        value, grad = out[rank]
        assert value == pytest.approx(float(expected), rel=1e-5)
        assert torch.allclose(grad / 2, whole.grad[rank::2], atol=1e-6)


def test_synced_standardize_matches_batch_norm_on_one_process():
    """Training output, running statistics and evaluation output equal BatchNorm1d's
    (affine off) on one process; a one-sample batch uses the running statistics."""
    x = torch.randn(4, 20, 8, generator=torch.Generator().manual_seed(6)) * 3 + 1
    ours, ref = SyncedStandardize(8), torch.nn.BatchNorm1d(8, affine=False)
    for batch in x:
        assert torch.allclose(ours(batch), ref(batch), atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    assert int(ours.num_batches_tracked) == 4
    single = x[0, :1]
    expected = (single - ref.running_mean) / torch.sqrt(ref.running_var + 1e-5)
    assert torch.allclose(ours(single), expected, atol=1e-5)
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x[1]), ref(x[1]), atol=1e-5)


def _two_rank_standardize(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        norm = SyncedStandardize(x.shape[-1])
        local = x[rank] if rank == 0 else x[rank, :1]  # uneven: 12 samples and 1
        y = norm(local)
        out[rank] = (y, norm.running_mean.clone(), norm.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_synced_standardize_two_gloo_ranks_share_statistics():
    """Real 2-process gloo with uneven batches (12 and 1 samples): both ranks normalise with
    the global batch's moments and end with identical running statistics, so the probe
    replicas (and checkpoints) cannot drift apart."""
    x = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(7)) * 2 - 1
    whole = torch.cat([x[0], x[1, :1]])
    ref = torch.nn.BatchNorm1d(6, affine=False)
    expected = ref(whole)
    out = mp.Manager().dict()
    mp.spawn(_two_rank_standardize, args=(_free_port(), x, out), nprocs=2, join=True)
    assert torch.allclose(out[0][0], expected[:12], atol=1e-5)
    assert torch.allclose(out[1][0], expected[12:], atol=1e-5)
    for rank in (0, 1):
        assert torch.equal(out[rank][1], out[0][1]) and torch.equal(out[rank][2], out[0][2])
        assert torch.allclose(out[rank][1], ref.running_mean, atol=1e-6)
        assert torch.allclose(out[rank][2], ref.running_var, atol=1e-5)


# -------------------------------------------------------------------- targets without position


def _position_only_tokens(batch: int = 16) -> torch.Tensor:
    """What a content-free encoder emits: the same code at each position for every sample,
    plus a sliver of noise."""
    code = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(5))
    noise = 1e-3 * torch.randn(batch, 64, 32, generator=torch.Generator().manual_seed(6))
    return code + noise


def test_position_r2_near_one_for_position_only_and_near_zero_for_content():
    assert float(position_r2(layer_norm_targets(_position_only_tokens()))) > 0.99
    content = torch.randn(16, 64, 32, generator=torch.Generator().manual_seed(7))
    assert abs(float(position_r2(content))) < 0.15


def test_centring_leaves_a_position_only_encoder_at_the_baseline():
    """Uncentred, predicting the per-position mean (which a content-free predictor can
    learn) scores ~0 on a position-only encoder's targets; centred, the same encoder's
    targets are unit-scale noise and the best position-only prediction (0) scores ~ the
    loss of knowing nothing."""
    normed = layer_norm_targets(_position_only_tokens())
    mean = normed.mean(0)
    uncentred = latent_regression_loss(mean.expand_as(normed), normed)
    centred = center_targets(normed, mean)
    baseline = latent_regression_loss(torch.zeros_like(centred), centred)
    assert float(uncentred) < 1e-5
    assert float(baseline) > 0.3  # smooth-L1 of unit-variance targets against 0
    assert float(position_r2(centred)) < 0.2


def test_centring_keeps_content_that_differs_between_samples():
    content = torch.randn(16, 64, 32, generator=torch.Generator().manual_seed(8))
    normed = layer_norm_targets(_position_only_tokens() + 0.3 * content)
    centred = center_targets(normed, normed.mean(0))
    corr = torch.corrcoef(torch.stack([centred.flatten(), content.flatten()]))[0, 1]
    assert corr > 0.8


# ------------------------------------------------------------------------------ the JEPA task


def _task(**kw) -> MultimodalJEPA:
    args = dict(image_size=16, n_ehr_features=6,
                backbone={"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}, predictor_dim=12, predictor_depth=1, predictor_heads=2)  # fmt: skip
    return MultimodalJEPA(**{**args, **kw})


def _batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(9)
    return {
        "image": torch.rand(b, 1, 16, 16, 16, generator=g),
        "ehr": torch.randn(b, 6, generator=g),
        "ehr_missing": torch.zeros(b, 6, dtype=torch.bool),
        "label": torch.tensor([0.0, 1.0, float("nan"), 1.0])[:b],
    }


def test_per_modality_image_targets_do_not_change_when_the_ehr_changes():
    task = _task(target_mode="per_modality").eval()
    batch = _batch()
    other = {**batch, "ehr": batch["ehr"] + 5.0}
    a, b = task.targets(batch), task.targets(other)
    n_img = task.encoder.num_patches
    assert torch.equal(a["targets"][:, :n_img], b["targets"][:, :n_img])
    assert not torch.allclose(a["targets"][:, n_img:], b["targets"][:, n_img:])


def test_joint_image_targets_carry_the_ehr():
    task = _task(target_mode="joint").eval()
    batch = _batch()
    a, b = task.targets(batch), task.targets({**batch, "ehr": batch["ehr"] + 5.0})
    n_img = task.encoder.num_patches
    assert not torch.allclose(a["targets"][:, :n_img], b["targets"][:, :n_img])


def test_running_target_mean_is_bias_corrected_and_only_moves_in_training():
    task = _task(target_center_momentum=0.9)
    batch = _batch()
    task.train()
    task.targets(batch)  # first batch: the running mean *is* that batch's mean
    img, ehr = task.encode_targets(batch)
    first = layer_norm_targets(torch.cat([img, ehr], 1)).mean(0)
    assert torch.allclose(task.target_mean, first, atol=1e-6)
    assert int(task.target_mean_batches) == 1
    task.eval()
    before = task.target_mean.clone()
    task.targets(batch)
    assert torch.equal(task.target_mean, before)


def test_unknown_target_mode_is_refused():
    with pytest.raises(ValueError, match="target_mode"):
        _task(target_mode="both")


def test_an_ehr_group_size_that_does_not_divide_the_features_is_refused_at_init():
    n = _task().hparams.n_ehr_features
    with pytest.raises(ValueError, match="ehr_mask_group_size"):
        _task(ehr_mask_group_size=n + 1)


# ------------------------------------------------------------------------------ schedules


def test_ema_init_share_is_the_product_of_momenta():
    total = 50
    expected = math.prod(ema_momentum(s, total, 0.9, 1.0) for s in range(20))
    assert ema_init_share(20, total, 0.9, 1.0) == pytest.approx(expected)
    assert ema_init_share(0, total, 0.9) == 1.0
    # the old quickstart schedule: 0.996 -> 1 over 400 steps keeps > 40 % at the end
    assert ema_init_share(400, 400, 0.996) > 0.4


def test_warmup_stable_decay_shape():
    lr = [warmup_stable_decay(s, 10, 100, decay_fraction=0.2, min_ratio=0.1) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lr[10:80])
    assert lr[90] == pytest.approx(0.55) and lr[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[80:], lr[81:], strict=False))


def test_cosine_ramp_weight_decay():
    assert cosine_ramp(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_ramp(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_ramp(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine_ramp(500, 100, 0.04, 0.4) == pytest.approx(0.4)


def test_residual_rescale_divides_block_outputs_by_depth():
    torch.manual_seed(0)
    plain = VisionTransformer3D(16, 8, embed_dim=24, depth=3, num_heads=2)
    torch.manual_seed(0)
    scaled = VisionTransformer3D(16, 8, embed_dim=24, depth=3, num_heads=2, residual_rescale=True)
    for i, (a, b) in enumerate(zip(plain.blocks, scaled.blocks, strict=True)):
        k = math.sqrt(2 * (i + 1))
        assert torch.allclose(a.attn.proj.weight / k, b.attn.proj.weight)
        assert torch.allclose(a.mlp[-1].weight / k, b.mlp[-1].weight)
        assert torch.equal(a.attn.qkv.weight, b.attn.qkv.weight)


# ------------------------------------------------------------------------------ references


def test_offline_probe_separates_informative_features_and_is_nan_without_two_classes():
    g = torch.Generator().manual_seed(10)
    y = (torch.rand(200, generator=g) < 0.5).float().numpy()
    z = torch.randn(200, 8, generator=g).numpy()
    z[:, 0] += 2 * y
    auc = offline_probe_auroc(z[:120], y[:120], z[120:], y[120:])
    assert auc > 0.8
    noise = offline_probe_auroc(z[:120, 1:], y[:120], z[120:, 1:], y[120:])
    assert 0.3 < noise < 0.7
    ones = y.copy()
    ones[:] = 1.0
    assert math.isnan(offline_probe_auroc(z[:120], ones[:120], z[120:], y[120:]))


def test_auto_ema_start_leaves_five_percent_after_a_tenth_of_the_run():
    for total in (200, 800, 2000):
        start = ema_start_for_share(total)
        assert 0.5 < start < 0.996
        assert ema_init_share(math.ceil(total / 10), total, start) == pytest.approx(0.05, abs=1e-6)
    assert ema_start_for_share(100_000) == 0.996  # long runs keep I-JEPA's momentum


def test_training_centres_by_the_batch_mean_so_a_position_only_prediction_is_zero():
    task = _task().train()
    t = task.targets(_batch())
    assert torch.allclose(t["baseline"], torch.zeros_like(t["targets"]))
    # the batch's own mean was removed: what is left averages to ~0 at every position
    assert t["targets"].mean(0).abs().mean() < 0.3
    assert float(position_r2(t["targets"])) < 0.3


def test_sigreg_rank_with_no_samples_still_joins_and_gets_the_global_value():
    """A rank whose masks dropped the modality passes zero samples; with the statistics
    summed over ranks both get the value of the samples that exist."""
    z = torch.randn(32, 32, generator=torch.Generator().manual_seed(11))
    whole = sigreg(z, DIRS)
    stats = {}
    for name, part in (("full", z), ("empty", z[:0])):
        seen: list[torch.Tensor] = []
        sigreg(part, DIRS, reduce_sum=lambda x, seen=seen: seen.append(x) or x)
        stats[name] = seen
    summed = [a + b for a, b in zip(stats["full"], stats["empty"], strict=True)]
    for part in (z, z[:0]):
        it = iter(summed)
        value, n = sigreg(part, DIRS, reduce_sum=lambda x, it=it: next(it), return_n=True)
        assert float(n) == 32 and torch.allclose(value, whole, rtol=1e-5)
    value, n = sigreg(z[:0], DIRS, return_n=True)
    assert float(n) == 0 and float(value) == 0.0


def test_one_class_validation_labels_log_nan_auroc_with_a_warning(caplog):
    """torchmetrics gives 0.0 for a one-class AUROC; the probe logs NaN (undefined) instead."""
    from torchmetrics.classification import BinaryAUROC

    task = MultimodalJEPA(image_size=16, n_ehr_features=4, backbone={"patch_size": 8, "embed_dim": 16,
                          "depth": 1, "num_heads": 2}, predictor_dim=8, predictor_depth=1, predictor_heads=2)  # fmt: skip
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    metric = BinaryAUROC()
    metric.update(torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0.0, 0.0, 0.0]))
    task.count_probe_labels(torch.tensor([0.0, 0.0, 0.0]))
    with caplog.at_level("WARNING"):
        task.log_probe_auroc("val/probe_auroc", metric)
    assert math.isnan(logged["val/probe_auroc"])
    assert "3 labelled validation scans are all negative" in caplog.text

    task.reset_probe_label_counts()
    metric.reset()
    metric.update(torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0.0, 1.0, 0.0]))
    task.count_probe_labels(torch.tensor([0.0, 1.0, 0.0]))
    task.log_probe_auroc("val/probe_auroc", metric)
    assert logged["val/probe_auroc"] == 1.0


def test_sigreg_standardized_ignores_scale_and_offset_but_not_anisotropy():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(512, 32, generator=g)
    base = sigreg(z, DIRS, standardize=True)
    assert torch.allclose(sigreg(0.01 * z + 5.0, DIRS, standardize=True), base, rtol=1e-3)
    assert sigreg(0.01 * z + 5.0, DIRS) > 50 * base  # the fixed-scale form punishes the scale
    low_rank = torch.randn(512, 2, generator=g) @ torch.randn(2, 32, generator=g)
    assert sigreg(low_rank, DIRS, standardize=True) > 10 * base


def test_sigreg_sees_the_full_image_embedding_not_the_masked_context():
    """sigreg_input=full: the regularised embedding does not depend on the JEPA mask."""
    task = MultimodalJEPA(image_size=16, n_ehr_features=4, backbone={"patch_size": 8, "embed_dim": 16,
                          "depth": 1, "num_heads": 2}, predictor_dim=8, predictor_depth=1, predictor_heads=2,
                          sigreg_weight=1.0)  # fmt: skip
    batch = {"image": torch.randn(4, 1, 16, 16, 16), "ehr": torch.randn(4, 4),
             "ehr_missing": torch.zeros(4, 4, dtype=torch.bool)}  # fmt: skip
    context = torch.randn(4, 3, 16)
    a = task.sigreg_parts(batch, context, 2)
    b = task.sigreg_parts(batch, torch.randn(4, 5, 16), 1)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    full = task.encoder(batch["image"], None, batch["ehr_missing"]).mean(1)
    assert torch.allclose(a[0], full)


def test_cross_modal_term_predicts_the_pooled_ehr_target_from_the_image():
    from jepa_lightning.masking import JEPAMaskCollator

    task = _task(cross_modal_weight=0.5, sigreg_weight=0.5).eval()
    batch = JEPAMaskCollator(grid=(2, 2, 2), n_ehr_features=6, block_scale=(0.1, 0.15),
                             p_image_only=0.0, p_ehr_only=0.0, min_context=2, rank=0)(_batch())  # fmt: skip
    out = task.ssl_losses(batch)
    image = task.pool(task.encoder(batch["image"], None, batch["ehr_missing"]))
    ehr = task.target_encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
    target = torch.nn.functional.layer_norm(ehr, ehr.shape[-1:])
    expected = torch.nn.functional.smooth_l1_loss(task.cross_predictor(image), target)
    assert torch.allclose(out["loss_cross_modal"], expected, atol=1e-6)
    out["loss_cross_modal"].backward()
    grads = [
        p.grad for n, p in task.encoder.named_parameters() if "patch" in n and p.grad is not None
    ]
    assert grads and sum(g.abs().sum() for g in grads) > 0  # it reaches the image encoder
    with pytest.raises(ValueError, match="use_ehr"):
        _task(cross_modal_weight=0.5, use_ehr=False)
