"""Pure loss functions. Every loss is computed in fp32 whatever the autocast dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: sums a tensor over DDP ranks, differentiably (``jepa_lightning.distributed.all_reduce_sum``)
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def layer_norm_targets(hidden: torch.Tensor) -> torch.Tensor:
    """JEPA targets: target-encoder outputs normalised per token over channels, in fp32,
    with no learnable affine (so the predictor cannot chase a moving scale)."""
    hidden = hidden.float()
    return F.layer_norm(hidden, hidden.shape[-1:])


def latent_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    kind: str = "smooth_l1",
    beta: float = 1.0,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """Mean per-element regression loss between predicted and target latents ``[B, T, C]``.

    ``weight [B, T]`` (0/1 or soft) removes tokens from the average, e.g. EHR targets whose
    value is missing: predicting the embedding of "missing" teaches nothing. Returns 0
    (with a graph) when nothing is weighted in, so a batch without valid targets is safe.
    ``reduce_sum`` (see :func:`weighted_mean`) averages over the tokens of every DDP rank.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    elif kind == "l1":
        per = (pred - target).abs()
    elif kind == "l2":
        per = (pred - target) ** 2
    else:
        raise ValueError(f"unknown latent loss {kind!r}: use smooth_l1, l1 or l2")
    per_token = per.mean(-1) if per.shape[-1] else per.sum(-1)
    return weighted_mean(per_token, weight, reduce_sum)


def weighted_mean(
    values: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """``sum(values * weight) / sum(weight)`` (every entry weighted 1 when ``weight`` is None);
    0 with a graph when the total weight is 0.

    ``reduce_sum`` sums a tensor over DDP ranks, differentiably
    (:func:`jepa_lightning.distributed.all_reduce_sum`): numerator and denominator are then
    the global batch's, so the value is the mean one process would compute on the whole
    batch, whatever each rank's count (labelled scans, observed values, target tokens).
    A per-rank mean averaged by DDP would weight a rank's few entries like another's many.
    Every rank must call it (a rank with nothing to average passes empty tensors).
    """
    values = values.float()
    weight = torch.ones_like(values) if weight is None else weight.float()
    total = (values * weight).sum()
    count = weight.sum().detach()
    if reduce_sum is not None:
        total, count = reduce_sum(total), reduce_sum(count)
    if count <= 0:
        return total * 0.0
    return total / count


def masked_bce_with_logits(
    logits: torch.Tensor, labels: torch.Tensor, reduce_sum: ReduceSum | None = None
) -> torch.Tensor:
    """Binary cross-entropy over the labelled entries only (NaN label = unlabelled), averaged
    over the labelled scans of every DDP rank when ``reduce_sum`` is given."""
    labelled = ~torch.isnan(labels)
    per = F.binary_cross_entropy_with_logits(
        logits.float(), torch.where(labelled, labels, 0.0).float(), reduction="none"
    )
    return weighted_mean(per, labelled, reduce_sum)


def variance_hinge(
    z: torch.Tensor,
    target_std: float = 1.0,
    eps: float = 1e-4,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """VICReg's variance term on ``z [B, C]``: mean over channels of ``relu(target - std)``.

    Applied to per-sample pooled context embeddings it penalises a batch whose samples all
    look alike, the failure where tokens carry only their position and the latent loss is
    trivially small. The (unbiased) variance is the global batch's when ``reduce_sum`` sums
    over DDP ranks. Needs ``B >= 2`` over all ranks; returns 0 otherwise.
    """
    z = z.float()
    first = torch.cat([z.sum(0), z.new_full((1,), float(z.shape[0]))])
    if reduce_sum is not None:
        first = reduce_sum(first)
    n = first[-1].detach()
    if n < 2:
        return z.sum() * 0.0
    squares = ((z - first[:-1] / n) ** 2).sum(0)
    if reduce_sum is not None:
        squares = reduce_sum(squares)
    std = torch.sqrt(squares / (n - 1) + eps)
    return F.relu(target_std - std).mean()


# --- baselines: MAE, MSN, CLIP-style InfoNCE -------------------------------------------------


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's normalised-pixel target: each patch ``[..., P]`` to zero mean, unit variance
    over its voxels (unbiased variance, as in the MAE paper's code). Makes the target
    local texture rather than absolute intensity, which the MAE paper found gives better
    features."""
    patches = patches.float()
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(
    pred: torch.Tensor,
    patches: torch.Tensor,
    masked: torch.Tensor,
    norm_pix: bool = True,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """MSE between predicted and true voxels of the *masked* patches only.

    ``pred, patches [B, N, P]`` (all patches, raster order), ``masked [B, N]`` bool (True =
    hidden from the encoder). Visible patches are not scored: reconstructing what the
    encoder saw teaches nothing. Per-patch mean squared error, averaged over masked patches
    (of every DDP rank when ``reduce_sum`` is given, see :func:`weighted_mean`).
    """
    target = normalize_patches(patches) if norm_pix else patches.float()
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return weighted_mean(per_patch, masked, reduce_sum)


def prototype_probabilities(
    z: torch.Tensor, prototypes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft assignment of embeddings ``z [N, D]`` to prototypes ``[K, D]``: softmax over the
    cosine similarities divided by ``temperature``, ``[N, K]``, in fp32."""
    z = F.normalize(z.float(), dim=-1)
    protos = F.normalize(prototypes.float(), dim=-1)
    return torch.softmax(z @ protos.T / temperature, dim=-1)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p ** (1/T)`` renormalised: MSN's target sharpening (T < 1 lowers the entropy)."""
    p = p.float() ** (1.0 / temperature)
    return p / p.sum(-1, keepdim=True)


def sinkhorn(
    probs: torch.Tensor, n_iters: int = 3, reduce_sum: ReduceSum | None = None
) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of target assignments ``probs [B, K]`` (MSN's targets, as in
    SwAV): alternately rescale so that every prototype receives the same total mass over
    the (global) batch and every sample's assignment sums to the same; after ``n_iters``
    rounds each row is renormalised to a distribution.

    Why: sharpened targets of a small batch can all pick the few prototypes that happened
    to be closest; equal prototype marginals spread the batch over the prototypes, the
    target-side counterpart of the mean-entropy term. Under DDP the prototype marginals
    are the global batch's (``reduce_sum``, no gradient needed: targets are constants),
    so N ranks x B balance exactly as one process x N·B."""
    q = probs.float().detach().clone()
    k = q.shape[1]
    n = q.new_tensor(float(q.shape[0]))
    total = q.sum()
    if reduce_sum is not None:
        n, total = reduce_sum(n), reduce_sum(total)
    if n < 1:
        return q
    q = q / total.clamp_min(1e-12)
    for _ in range(n_iters):
        per_prototype = q.sum(0)
        if reduce_sum is not None:
            per_prototype = reduce_sum(per_prototype)
        q = q / per_prototype.clamp_min(1e-12) / k  # each prototype: 1/K of the mass
        q = q / q.sum(1, keepdim=True).clamp_min(1e-12) / n  # each sample: 1/N of it
    return q * n  # rows are distributions


def msn_loss(
    anchor_probs: torch.Tensor,
    target_probs: torch.Tensor,
    me_max_weight: float = 1.0,
    reduce_sum: ReduceSum | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked Siamese Networks' objective.

    ``anchor_probs [B * M, K]`` (M anchor views per sample, view-major: all samples of view 0,
    then view 1, ...) and ``target_probs [B, K]`` (already sharpened; treated as constants).
    Returns ``(loss, cross_entropy, mean_entropy)`` where

    * ``cross_entropy`` = mean over samples and views of ``H(target_b, anchor_{b,m})``;
    * ``mean_entropy`` = entropy of the anchor probabilities averaged over the whole batch
      (the ME-MAX regulariser: maximising it keeps every prototype in use, which is what
      stops all samples collapsing onto one prototype);
    * ``loss = cross_entropy - me_max_weight * mean_entropy``.

    With ``reduce_sum`` (a differentiable sum over DDP ranks) both means are over the global
    batch: MSN averages the mean prediction over ranks *before* taking its entropy (a mean
    of per-rank entropies is a different, weaker regulariser). A rank may hold no sample.
    """
    anchor_probs, target_probs = anchor_probs.float(), target_probs.float().detach()
    b = target_probs.shape[0]
    if b and anchor_probs.shape[0] % b:
        raise ValueError(
            f"{anchor_probs.shape[0]} anchor rows is not a multiple of {b} target rows"
        )
    views = anchor_probs.shape[0] // b if b else 0
    targets = target_probs.repeat(views, 1)
    per_row = -(targets * torch.log(anchor_probs.clamp_min(1e-12))).sum(-1)
    ce = weighted_mean(per_row, None, reduce_sum)
    sums = torch.cat([anchor_probs.sum(0), anchor_probs.new_full((1,), float(len(anchor_probs)))])
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    mean_p = sums[:-1] / sums[-1].detach().clamp_min(1.0)
    mean_entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return ce - me_max_weight * mean_entropy, ce, mean_entropy


def clip_loss(
    image_emb: torch.Tensor, ehr_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE between paired embeddings ``[B, D]`` (row i of each is one patient).

    Cosine similarities times ``logit_scale`` (= 1 / temperature, learnable upstream) are
    the logits; the loss is the mean of image->EHR and EHR->image cross-entropies with the
    matching pair as the class. Needs ``B >= 2`` (one pair has no negative); returns 0 then.
    """
    if image_emb.shape[0] < 2:
        return image_emb.sum() * 0.0 + ehr_emb.sum() * 0.0
    img = F.normalize(image_emb.float(), dim=-1)
    ehr = F.normalize(ehr_emb.float(), dim=-1)
    logits = logit_scale.float() * img @ ehr.T
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# --- JEPA targets without position, and SIGReg -------------------------------------------------


def position_r2(tokens: torch.Tensor) -> torch.Tensor:
    """Share of the variance of ``tokens [B, N, C]`` explained by position alone.

    ``1 - SS(tokens - per-position mean over the batch) / SS(tokens - grand mean)``. Near 1
    means every sample has nearly the same token at a position: a predictor that knows only
    *where* a target is scores almost perfectly, so a low latent loss says nothing about
    content. Needs ``B >= 2`` (returns NaN otherwise)."""
    tokens = tokens.float()
    if tokens.shape[0] < 2:
        return tokens.new_tensor(float("nan"))
    within = (tokens - tokens.mean(0, keepdim=True)).pow(2).sum()
    total = (tokens - tokens.mean((0, 1), keepdim=True)).pow(2).sum()
    return 1.0 - within / total.clamp_min(1e-12)


def center_targets(
    normed: torch.Tensor, position_mean: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Content-only targets: remove the per-position mean ``[N, C]`` from layer-normed target
    tokens ``[B, N, C]``, then layer-norm again.

    Why: on a small patch grid the layer-normed targets are mostly the fixed position code
    (a content-free encoder scores well, see ``position_r2``). What is left after
    subtracting the per-position mean is what differs between patients; the second
    parameter-free layer norm puts it back on the unit scale the latent loss expects, so a
    position-only encoder now faces targets it cannot predict (loss at the baseline).
    ``eps`` is far below LayerNorm's usual 1e-5 on purpose: an encoder whose tokens differ
    between patients by only 0.1 % must still face unit-scale targets, or a near
    content-free encoder would score ~0 against near-zero targets."""
    centred = normed.float() - position_mean.float()
    return F.layer_norm(centred, centred.shape[-1:], eps=eps)


def sigreg_directions(
    dim: int, n_directions: int, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[dim, n_directions]`` random unit vectors from a generator keyed on ``seed`` only.

    The caller keys ``seed`` on the optimizer step: every DDP rank then draws the same
    directions without communicating, and a new sketch is drawn each step (LeJEPA)."""
    g = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
    a = torch.randn(dim, n_directions, generator=g, dtype=torch.float32)
    return (a / a.norm(dim=0, keepdim=True)).to(device)


def sigreg(
    z: torch.Tensor,
    directions: torch.Tensor,
    n_points: int = 17,
    t_max: float = 3.0,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_n: bool = False,
    standardize: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SIGReg (LeJEPA, Balestriero & LeCun 2025): how far ``z [N, D]`` is from an isotropic
    standard Gaussian, sketched along the unit ``directions [D, M]``.

    For each direction the Epps–Pulley statistic compares the empirical characteristic
    function of the projected samples with the Gaussian's ``exp(-t^2 / 2)``:
    ``N * int |ecf(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt`` over ``t in [-t_max, t_max]``
    (trapezoid on ``n_points`` nodes of ``[0, t_max]``, doubled by symmetry); the result is
    the mean over directions. A collapsed (constant or low-rank) embedding is far from
    ``N(0, I)`` in some direction and scores high; Gaussian samples score ~1.

    ``reduce_sum`` sums a tensor over DDP ranks (differentiably, e.g.
    ``jepa_lightning.distributed.all_reduce_sum``): the statistic is built from sums of
    ``cos``/``sin`` over samples, so summing those and the sample count over ranks gives
    exactly the value one process would compute on the whole global batch. A rank may
    pass zero samples (it still joins the reduction). ``return_n`` also returns the
    (global) sample count; with none anywhere the statistic is 0.

    ``standardize`` first centres ``z`` on its (global) batch mean and divides it by one
    scalar, its root-mean per-dimension std, with gradients through both (as batch norm
    has): the statistic then measures only the *shape* -- anisotropy (low rank) and
    non-Gaussianity -- not the overall scale or offset. Why: under Adam each weight moves
    about ``lr`` per step, so a short run cannot move an encoder's output scale 10x
    towards ``N(0, I)``; the fixed-scale target then spends the whole run pulling on scale
    and never on shape (quickstart: pooled std stuck near 0.09 and rank ~6 for weights
    0.5 to 4).
    """
    z = z.float()
    if standardize:
        z = _standardize(z, reduce_sum)
    t = torch.linspace(0.0, t_max, n_points, device=z.device)
    proj = z @ directions.to(z.device, torch.float32)  # [N, M]
    args = proj.unsqueeze(-1) * t  # [N, M, T]
    sums = torch.stack([args.cos().sum(0), args.sin().sum(0)])  # [2, M, T]
    n = torch.tensor(float(z.shape[0]), device=z.device)
    if reduce_sum is not None:
        sums = reduce_sum(sums)
        n = reduce_sum(n)
    if n < 1:
        zero = z.sum() * 0.0 + sums.sum() * 0.0
        return (zero, n) if return_n else zero
    ecf_cos, ecf_sin = sums[0] / n, sums[1] / n
    gauss = torch.exp(-0.5 * t**2)
    err = ((ecf_cos - gauss) ** 2 + ecf_sin**2) * gauss  # [M, T]
    integral = 2.0 * torch.trapezoid(err, t, dim=-1)  # [M]
    value = (n * integral).mean()
    return (value, n) if return_n else value


def _standardize(z: torch.Tensor, reduce_sum: Callable | None, eps: float = 1e-8) -> torch.Tensor:
    """``(z - mean) / rms_std`` over the (global) batch; one scalar scale for all dimensions,
    so relative variances (the anisotropy SIGReg is to remove) are kept. Two passes (mean,
    then centred squares): one pass in fp32 cancels catastrophically for large offsets."""
    total = torch.cat([z.sum(0), z.new_full((1,), float(z.shape[0]))])
    if reduce_sum is not None:
        total = reduce_sum(total)
    n = total[-1]
    if n < 2:
        return z
    centred = z - total[:-1] / n
    squares = (centred * centred).sum()
    if reduce_sum is not None:
        squares = reduce_sum(squares)
    return centred / torch.sqrt(squares / (n * z.shape[1]) + eps)
