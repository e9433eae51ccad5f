"""The baselines are the published methods: each property here failed before it was fixed.
References are written from the papers' equations, in float64."""

from __future__ import annotations

import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from jepa_lightning.distributed import all_gather_cat, all_reduce_sum
from jepa_lightning.evaluation import stats
from jepa_lightning.losses import msn_loss, sinkhorn
from jepa_lightning.tasks import MSN, ImageEHRContrastive

TINY = dict(image_size=16, n_ehr_features=4, backbone="micro", reference_metrics=False)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- CLIP temperature


def test_clip_temperature_keeps_its_gradient_past_the_clamp():
    """A clamp of ``exp(logit_scale)`` inside the forward has gradient 0 beyond it, for good;
    CLIP clamps the parameter after the optimizer step instead."""
    model = ImageEHRContrastive(**TINY)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    g = _gen(0)
    batch = {
        "image": torch.randn(4, 1, 16, 16, 16, generator=g),
        "ehr": torch.randn(4, 4, generator=g),
        "ehr_missing": torch.zeros(4, 4, dtype=torch.bool),
    }
    model.ssl_losses(batch)["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    model.on_train_batch_end(None, batch, 0)  # after the optimizer step
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))


# --------------------------------------------------------------------------- MSN


def _msn_reference(anchor: torch.Tensor, target: torch.Tensor, weight: float):
    """MSN's objective from the paper (float64): mean over anchors of H(target, anchor) minus
    the weight times the entropy of the mean anchor prediction over the whole batch."""
    anchor, target = anchor.double(), target.double()
    views = len(anchor) // len(target)
    ce = torch.stack(
        [-(target[i % len(target)] * anchor[i].log()).sum() for i in range(len(anchor))]
    ).mean()
    mean_p = anchor.mean(0)
    return ce - weight * -(mean_p * mean_p.log()).sum(), views


def test_msn_loss_matches_the_paper_in_float64():
    anchor = torch.softmax(torch.randn(12, 7, generator=_gen(1), dtype=torch.float64), -1)
    target = torch.softmax(torch.randn(4, 7, generator=_gen(2), dtype=torch.float64) * 3, -1)
    loss, _, _ = msn_loss(anchor, target, 0.7)
    expected, views = _msn_reference(anchor, target, 0.7)
    assert views == 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def _sinkhorn_reference(p: np.ndarray, iters: int) -> np.ndarray:
    """Sinkhorn-Knopp as MSN / SwAV write it: Q = P^T / sum(P); repeat {rows (prototypes) to
    1/K; columns (samples) to 1/B}; return B * Q^T."""
    q = p.T / p.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdims=True) / k
        q = q / q.sum(0, keepdims=True) / b
    return (q * b).T


def test_sinkhorn_matches_the_equations_and_balances_prototypes():
    p = torch.softmax(torch.randn(16, 6, generator=_gen(3), dtype=torch.float64) * 4, -1)
    out = sinkhorn(p, 3)
    assert np.allclose(out.numpy(), _sinkhorn_reference(p.numpy(), 3), rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.sum(1), torch.ones(16, dtype=out.dtype), atol=1e-5)
    balanced = sinkhorn(p, 200).sum(0)  # converged: every prototype gets B / K of the mass
    assert torch.allclose(balanced, torch.full((6,), 16 / 6, dtype=balanced.dtype), atol=1e-3)


def test_msn_uses_sinkhorn_by_default_and_its_prototypes_get_no_weight_decay():
    model = MSN(**TINY, focal_block=(1, 1, 1))
    assert model.hparams.sinkhorn_iters == 3  # MSN's published configuration
    groups = model.param_groups()
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.prototypes) not in decayed
    assert any(id(model.prototypes) in {id(p) for p in g["params"]} for g in groups)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        MSN(**TINY, sinkhorn_iters=-1)


# --------------------------------------------------------------------------- bootstrap precision


def test_metrics_keep_float64_scores_distinct():
    """Scores that differ below float32's resolution must not tie (float32: AUROC 0.5)."""
    prob = np.array([0.5, 0.5 + 1e-10, 0.3, 0.7 + 1e-12, 0.7])
    label = np.array([0, 1, 0, 1, 0])
    assert stats.metric("auroc", prob, label) == pytest.approx(5 / 6)
    boot = stats.bootstrap_distribution("auroc", prob[:, None], label, [np.arange(5)])
    assert boot[0, 0] == pytest.approx(5 / 6)


# --------------------------------------------------------------------------- collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_rank(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated collective (torch 2.13)
            local = (x[:1] if rank == 0 else x[1:]).clone().requires_grad_()  # uneven: 1 and 4
            gathered = all_gather_cat(local)
            total = all_reduce_sum((local**2).sum())
            (gathered.pow(3).sum() + total).backward()
        out[rank] = (gathered.detach(), float(total), local.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gather_and_sum_over_two_gloo_ranks_with_uneven_batches():
    """Every rank sees the whole concatenation and the whole sum; each local row's gradient
    is the sum over ranks of what every rank's loss sent it (DDP then averages: x 1/2)."""
    x = torch.randn(5, 3, generator=_gen(5))
    out = mp.Manager().dict()
    mp.spawn(_collectives_rank, args=(_free_port(), x, out), nprocs=2, join=True)
    whole = x.clone().requires_grad_()
    (whole.pow(3).sum() + (whole**2).sum()).backward()
    for rank, rows in ((0, slice(0, 1)), (1, slice(1, 5))):
        gathered, total, grad = out[rank]
        assert torch.allclose(gathered, x)
        assert total == pytest.approx(float((x**2).sum()), rel=1e-6)
        assert torch.allclose(grad / 2, whole.grad[rows], atol=1e-5)
