"""Masked Siamese Networks (MSN), optionally with the EHR fused into the anchor branch."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from jepa_lightning.backbones import EHRTokenizer
from jepa_lightning.losses import msn_loss, prototype_probabilities, sharpen, sinkhorn
from jepa_lightning.masking import focal_masks, random_masks
from jepa_lightning.tasks.momentum import MomentumSSLTask, frozen_copy


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MSN's three-layer projector. LayerNorm where MSN has BatchNorm: the EMA target
    projector then needs no running statistics (an EMA'd BatchNorm in eval mode would use
    its initial ones) and nothing has to be synchronised across DDP ranks."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
    )


def random_flips(volume: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample of ``[B, C, D, H, W]`` independently along each spatial axis with
    probability 1/2: a label-preserving view augmentation for nodule volumes."""
    for axis in (2, 3, 4):
        flip = torch.rand(volume.shape[0], device=volume.device, generator=generator) < 0.5
        volume = torch.where(flip.view(-1, 1, 1, 1, 1), volume.flip(axis), volume)
    return volume


class MSN(MomentumSSLTask):
    """MSN (Assran et al. 2022) on the shared 3-D encoder; ``use_ehr`` gives MSN+EHR.

    Anchor views (``n_random_views`` with a random ``mask_ratio`` of patches dropped,
    ``n_focal_views`` keeping one contiguous ``focal_block`` of patches; each with random
    flips) go through the encoder, mean-pooled, then the projector; the target view (the
    whole volume) through the EMA target encoder and EMA projector. Both are softly
    assigned to learned prototypes (cosine / ``temperature``); the target assignment is
    sharpened (``sharpen_temperature``), balanced over the prototypes by Sinkhorn-Knopp
    (``sinkhorn_iters``, as MSN's published configuration does), and the anchors are trained
    to match it, with the mean-entropy maximisation regulariser (``me_max_weight``) keeping
    every prototype used. Under DDP the mean prediction and the Sinkhorn marginals are the
    global batch's (:mod:`jepa_lightning.distributed`). The prototypes are learned and get no
    weight decay (MSN excludes them).

    MSN+EHR (``use_ehr: true``): an EHR embedding (an :class:`EHRTokenizer`, mean-pooled
    over features) is concatenated with each anchor embedding and projected back to the
    encoder width before the projector; the target branch stays image-only. The encoder
    therefore only ever sees images, exactly as in vanilla MSN, so the two compare like
    for like under an image linear probe.

    The checkpoint's ``target_encoder`` (EMA) and ``encoder`` both load into
    ``DiagnosisTask`` (``init_from_encoder``); MSN evaluates the target encoder.

    Args:
        use_ehr: fuse the EHR into the anchor branch (MSN+EHR).
        n_random_views / mask_ratio: randomly masked anchor views and their drop ratio.
        n_focal_views / focal_block: anchor views keeping one block of patches (D, H, W).
        flip_views: random flips of each anchor view.
        proj_hidden_dim / proj_dim / n_prototypes: projector and learned prototypes.
        temperature: anchor (and target, before sharpening) softmax temperature.
        sharpen_temperature: target sharpening, ``p ** (1/T)`` renormalised.
        me_max_weight: weight of the mean-entropy maximisation regulariser.
        sinkhorn_iters: Sinkhorn-Knopp rounds on the sharpened targets (MSN: 3; 0 = off).
        ema_momentum_start: EMA start momentum (MSN: 0.996; ``auto`` as in JEPA).
        **kwargs: ``ema_momentum_end`` (:class:`MomentumSSLTask`), ``reference_metrics``
            (:class:`SSLTask`), the backbone and the optimizer (:class:`BaseTask`).
    """

    LOSS_KEYS = ("loss", "loss_ce", "mean_entropy")

    def __init__(
        self,
        use_ehr: bool = False,
        n_random_views: int = 2,
        mask_ratio: float = 0.5,
        n_focal_views: int = 2,
        focal_block: tuple[int, int, int] = (2, 2, 2),
        flip_views: bool = True,
        proj_hidden_dim: int = 256,
        proj_dim: int = 64,
        n_prototypes: int = 128,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        me_max_weight: float = 1.0,
        sinkhorn_iters: int = 3,
        ema_momentum_start: float | Literal["auto"] = 0.996,
        **kwargs,
    ):
        super().__init__(ema_momentum_start=ema_momentum_start, **kwargs)
        if n_random_views + n_focal_views < 1:
            raise ValueError("MSN needs at least one anchor view: n_random_views + n_focal_views")
        if sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters must be >= 0, got {sinkhorn_iters}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        embed_dim, n_ehr_features = self.embed_dim, self.hparams.n_ehr_features
        self.encoder = self.build_encoder()
        # The encoder only ever sees images (in MSN+EHR too): its EHR tokenizer gets no
        # gradient, so it is frozen rather than left for DDP to find unused.
        self.encoder.ehr.requires_grad_(False)
        self.target_encoder = frozen_copy(self.encoder)
        self.projector = projection_head(embed_dim, proj_hidden_dim, proj_dim)
        self.target_projector = frozen_copy(self.projector)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, proj_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.focal_block = tuple(int(b) for b in focal_block)
        if n_focal_views:
            focal_masks(1, self.encoder.grid, self.focal_block)  # fail early if it cannot fit
        self.n_keep = max(1, round(self.encoder.num_patches * (1.0 - mask_ratio)))
        if use_ehr:
            self.ehr_embed = EHRTokenizer(n_ehr_features, embed_dim)
            self.fuse = nn.Linear(2 * embed_dim, embed_dim)
        self.init_monitors()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def anchor_embeddings(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pooled encoder output of every anchor view, view-major, ``[B * M, C]``."""
        image = batch["image"]
        b, n = len(image), self.encoder.num_patches
        h = self.hparams
        keeps = [
            random_masks(b, n, self.n_keep, image.device, generator)[0]
            for _ in range(h.n_random_views)
        ]
        keeps += [
            focal_masks(b, self.encoder.grid, self.focal_block, image.device, generator)
            for _ in range(h.n_focal_views)
        ]
        views = []
        for keep in keeps:
            view = random_flips(image, generator) if h.flip_views else image
            views.append(self.encoder(view, image_keep=keep).mean(1))
        z = torch.cat(views)
        if h.use_ehr:
            ehr = self.ehr_embed(batch["ehr"], batch["ehr_missing"]).mean(1)
            z = self.fuse(torch.cat([z, ehr.repeat(len(keeps), 1)], dim=1))
        return z

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        h = self.hparams
        reduce = self.loss_reduce_sum()
        with torch.no_grad():
            target_tokens = self.target_encoder(batch["image"])
            pooled = self.pool(target_tokens)  # what the probes read
            target_probs = sharpen(
                prototype_probabilities(
                    self.target_projector(target_tokens.mean(1)),
                    self.prototypes.detach(),
                    h.temperature,
                ),
                h.sharpen_temperature,
            )
            if h.sinkhorn_iters:
                target_probs = sinkhorn(target_probs, h.sinkhorn_iters, reduce)
        anchor_probs = prototype_probabilities(
            self.projector(self.anchor_embeddings(batch, generator)), self.prototypes, h.temperature
        )
        loss, ce, mean_entropy = msn_loss(anchor_probs, target_probs, h.me_max_weight, reduce)
        return {"loss": loss, "loss_ce": ce, "mean_entropy": mean_entropy, "pooled": pooled}
