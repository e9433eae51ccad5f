"""MultimodalJEPA: predict, in latent space, what an EMA target encoder says about hidden parts
of a patient's CT and EHR, from the visible parts (image -> image, image -> EHR, EHR -> image).

What makes it learn (each measured on the quickstart cohort; tasks/README.md, "Watching for
collapse"):

* **Targets about their own modality** (``target_mode: per_modality``): the target encoder
  encodes the image alone and the EHR alone. When it sees both, image target tokens carry
  EHR content that the predictor copies from the EHR context, and the image pathway is
  never made to encode the image.
* **Targets without position** (``target_centering``): a running per-position mean of the
  layer-normed targets is subtracted and the rest layer-normed again. On a small patch grid
  position explains most of the target variance, so a content-free encoder scores well.
* **An anti-collapse term per modality** (``sigreg_weight``: SIGReg, LeJEPA) on the pooled
  full-image and full-EHR embeddings of the online encoder (``sigreg_input``), with random
  directions and statistics shared by all DDP ranks. On pooled *masked contexts* it was
  met by encoding which patches the mask kept.
* **Monitors with references**: the image-only probe, effective rank and feature spread are
  also measured on the random-init encoder at step 0 (``ref/*``), so "collapsed" has a scale.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from jepa_lightning.backbones import JEPAPredictor
from jepa_lightning.backbones.pooling import center_token_indices
from jepa_lightning.backbones.vit3d import gather_tokens
from jepa_lightning.distributed import all_reduce_sum
from jepa_lightning.losses import (
    center_targets,
    latent_regression_loss,
    layer_norm_targets,
    position_r2,
    sigreg,
    sigreg_directions,
    variance_hinge,
)
from jepa_lightning.masking import JEPAMaskCollator
from jepa_lightning.tasks.momentum import MomentumSSLTask, frozen_copy

MASK_KEYS = ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx")


class MultimodalJEPA(MomentumSSLTask):
    """Multimodal JEPA pretraining.

    Args:
        predictor_dim / predictor_depth / predictor_heads: the narrow predictor.
        use_ehr: False gives image-only I-JEPA (EHR neither context nor target).
        n_blocks / block_scale / block_aspect / block_z_scale: 3-D target blocks (scale is
            the share of patches per block; z gets its own stretch).
        ehr_mask_ratio: share of EHR tokens that are targets in joint batches.
        ehr_mask_group_size: EHR features masked together in consecutive groups of this many
            (4 on LIDC: one attribute's four readers), so a masked rating is not read off
            another reader's rating of the same attribute; must divide the feature count.
        p_image_only / p_ehr_only: probability that a batch drops the EHR (image -> EHR) or
            the image (EHR -> image) from the context.
        lesion_masking: lesion-aware target blocks: every sample's blocks cover part of the
            ``pool_center_size``³ patches at the crop centre and its context keeps the rest
            (:func:`~jepa_lightning.masking.multiblock_masks`). That is where an ROI-centred
            crop puts the lesion (``preprocess.crop_size`` with ``roi_x/y/z``, or files cut
            around it as LIDC's are); an archive without ROIs has no lesion there: leave it off.
        target_mode: ``per_modality`` (image targets from the target encoder on the image
            alone, EHR targets on the EHR alone) or ``joint`` (one pass over both, the
            original form: image targets then carry EHR content).
        target_centering: subtract the per-position mean from the layer-normed targets and
            layer-norm again (:func:`~jepa_lightning.losses.center_targets`). In training the
            mean is the batch's own (averaged over ranks), so no per-position component is
            left for a content-free predictor; in evaluation it is a running mean of those.
        target_center_momentum: EMA momentum of that running mean (bias-corrected, so the
            first batches are not pulled towards 0).
        ehr_loss_weight: weight of the EHR-target loss next to the image-target loss.
        sigreg_weight: weight of SIGReg (sketched isotropic-Gaussian regulariser, LeJEPA) on
            each modality's pooled context embedding; 0 = off.
        sigreg_directions / sigreg_points: random directions of the sketch (new ones every
            step, identical on every rank) and integration nodes of the Epps–Pulley test.
        sigreg_input: what SIGReg sees. ``full``: the online encoder's pooled embedding of
            the whole image alone and of the whole EHR alone (one extra encoder pass) -- the
            embedding that probes and finetuning use. ``context``: the pooled context tokens
            of the masked views; a pooled context varies with *which* patches survived the
            mask, and on the quickstart cohort 73 % of its variance was that mask layout, so
            SIGReg was met without spreading the full-image embedding (rank 35 -> 6.5).
        sigreg_standardize: centre the pooled embeddings and divide them by one scalar (their
            batch RMS std) before SIGReg, so it shapes them (isotropy) instead of pulling on
            their scale, which a short run cannot move (see :func:`losses.sigreg`).
        variance_weight: weight of a VICReg variance hinge on the pooled context embeddings
            (0 = off; the older anti-collapse option, kept for comparison).
        cross_modal_weight: weight of a whole-scan cross-modal prediction (0 = off): a small
            MLP predicts, from the online encoder's pooled full-image embedding, the target
            encoder's layer-normed pooled full-EHR embedding (smooth L1, no negatives; SIGReg
            keeps the image embedding from collapsing). Why: the token-level image -> EHR
            targets passed none of the reading into the image encoder on LIDC, where CLIP's
            whole-scan alignment did (tasks/README.md, "Reading out the lesion").
        loss: ``smooth_l1`` | ``l1`` | ``l2`` on the targets, in fp32.
        residual_rescale: I-JEPA's init, residual branch outputs scaled by 1/sqrt(2 * depth).
        lr: peak learning rate (:class:`BaseTask`); 1.5e-3 here.
        **kwargs: the EMA schedule (:class:`MomentumSSLTask`), ``reference_metrics``
            (:class:`SSLTask`), the backbone and the optimizer (:class:`BaseTask`).
    """

    LOSS_KEYS = (
        "loss",
        "loss_image",
        "loss_ehr",
        "loss_sigreg",
        "loss_variance",
        "loss_cross_modal",
        "loss_vs_position_baseline",
        "target_position_r2",
    )

    def __init__(
        self,
        predictor_dim: int = 48,
        predictor_depth: int = 2,
        predictor_heads: int = 4,
        use_ehr: bool = True,
        n_blocks: int = 4,
        block_scale: tuple[float, float] = (0.15, 0.2),
        block_aspect: tuple[float, float] = (0.75, 1.5),
        block_z_scale: tuple[float, float] = (0.75, 1.5),
        ehr_mask_ratio: tuple[float, float] = (0.3, 0.6),
        ehr_mask_group_size: int = 1,
        p_image_only: float = 0.2,
        p_ehr_only: float = 0.2,
        lesion_masking: bool = False,
        target_mode: Literal["per_modality", "joint"] = "per_modality",
        target_centering: bool = True,
        target_center_momentum: float = 0.99,
        ehr_loss_weight: float = 1.0,
        sigreg_weight: float = 0.0,
        sigreg_directions: int = 64,
        sigreg_points: int = 17,
        sigreg_input: Literal["full", "context"] = "full",
        sigreg_standardize: bool = False,
        variance_weight: float = 0.0,
        cross_modal_weight: float = 0.0,
        loss: str = "smooth_l1",
        residual_rescale: bool = False,
        lr: float = 1.5e-3,
        **kwargs,
    ):
        super().__init__(lr=lr, **kwargs)
        if sigreg_input not in ("full", "context"):
            raise ValueError(f"sigreg_input must be 'full' or 'context', got {sigreg_input!r}")
        if target_mode not in ("per_modality", "joint"):
            raise ValueError(f"target_mode must be 'per_modality' or 'joint', got {target_mode!r}")
        n_ehr = self.hparams.n_ehr_features
        if use_ehr and (ehr_mask_group_size < 1 or n_ehr % ehr_mask_group_size):
            raise ValueError(
                f"model.init_args.ehr_mask_group_size={ehr_mask_group_size} must divide the "
                f"{n_ehr} EHR features (consecutive groups are masked together)"
            )
        self.encoder = self.build_encoder(residual_rescale)
        self.target_encoder = frozen_copy(self.encoder)
        self.predictor = JEPAPredictor(
            self.encoder.grid,
            self.hparams.n_ehr_features,
            self.embed_dim,
            predictor_dim,
            predictor_depth,
            predictor_heads,
        )
        if cross_modal_weight > 0 and not use_ehr:
            raise ValueError("cross_modal_weight > 0 predicts the EHR: use_ehr must be true")
        dim = self.embed_dim
        self.cross_predictor = (
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
            if cross_modal_weight > 0
            else None
        )
        # Online probes on detached target features: the image-only one is what checkpoint
        # selection uses (val/probe_auroc); the joint one sees image and EHR.
        self.init_monitors(joint_probe=True)
        n_tokens = self.encoder.num_patches + self.hparams.n_ehr_features
        # Running per-position mean of the layer-normed targets (image positions, then EHR
        # features) and the number of batches in it; saved, so a resume keeps centring alike.
        self.register_buffer("target_mean", torch.zeros(n_tokens, self.embed_dim))
        self.register_buffer("target_mean_batches", torch.zeros((), dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder)]

    # --- masks are made in the loader workers --------------------------------------------
    def mask_collator(self) -> JEPAMaskCollator:
        h = self.hparams
        return JEPAMaskCollator(
            grid=self.encoder.grid,
            n_ehr_features=h.n_ehr_features,
            n_blocks=h.n_blocks,
            block_scale=tuple(h.block_scale),
            block_aspect=tuple(h.block_aspect),
            block_z_scale=tuple(h.block_z_scale),
            ehr_mask_ratio=tuple(h.ehr_mask_ratio),
            ehr_mask_group_size=h.get("ehr_mask_group_size", 1),
            p_image_only=h.p_image_only,
            p_ehr_only=h.p_ehr_only,
            use_ehr=h.use_ehr,
            lesion=self.lesion_patches() if h.get("lesion_masking", False) else None,
            rank=self.global_rank,
        )

    def lesion_patches(self) -> tuple[int, ...]:
        """The patches lesion-aware masks treat as the lesion: the ones ``pooling: center``
        reads."""
        size = self.hparams.get("pool_center_size", 2)
        return tuple(center_token_indices(self.encoder.grid, size).tolist())

    def collate_hook(self) -> JEPAMaskCollator:
        """What the data module's loaders apply to each batch (installed by
        :class:`~jepa_lightning.callbacks.DataContract`)."""
        return self.mask_collator()

    def empty_batch(self) -> dict:
        """:meth:`BaseTask.empty_batch` with (empty) mask indices: one image context and one
        image target position per sample, no EHR ones; any lengths serve zero samples."""
        batch = super().empty_batch()
        index = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        none = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        batch.update(ctx_image_idx=index, tgt_image_idx=index, ctx_ehr_idx=none, tgt_ehr_idx=none)
        return batch

    # --- targets -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target-encoder outputs ``(image [B, N, C], EHR [B, F, C] or None)``.

        ``per_modality``: one pass over the image alone and one over the EHR alone, so each
        modality's targets are about that modality. ``joint``: one pass over both."""
        image, missing = batch["image"], batch["ehr_missing"]
        ehr = batch["ehr"] if self.hparams.use_ehr else None
        n_img = self.encoder.num_patches
        if self.hparams.target_mode == "joint" and ehr is not None:
            hidden = self.target_encoder(image, ehr, missing)
            return hidden[:, :n_img], hidden[:, n_img:]
        img = self.target_encoder(image, None, missing)
        return img, (self.target_encoder(None, ehr, missing) if ehr is not None else None)

    @torch.no_grad()
    def update_target_mean(self, normed: torch.Tensor) -> torch.Tensor:
        """Fold this batch's per-position mean (over the samples of every rank) into the
        running mean; returns the batch mean (the running one for a batch of no sample)."""
        sums = normed.float().sum(0)
        count = sums.new_tensor(float(normed.shape[0]))
        if self.world_size() > 1:
            sums, count = all_reduce_sum(sums), all_reduce_sum(count)
        if count < 1:
            return self.target_mean[: normed.shape[1]]
        batch_mean = sums / count
        k = int(self.target_mean_batches)
        rate = max(1.0 / (k + 1), 1.0 - self.hparams.target_center_momentum)
        self.target_mean[: batch_mean.shape[0]].lerp_(batch_mean, rate)
        self.target_mean_batches += 1
        return batch_mean

    @torch.no_grad()
    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        """Targets at every image position and EHR feature, the position-only baseline
        prediction (the per-position running mean of the targets, 0 once centred), pooled
        features for the probes, and the position R² of the raw layer-normed targets."""
        img, ehr = self.encode_targets(batch)
        hidden = img if ehr is None else torch.cat([img, ehr], dim=1)
        normed = layer_norm_targets(hidden)
        out = {"target_position_r2": position_r2(normed)}
        running = self.target_mean[: normed.shape[1]]
        mean = self.update_target_mean(normed) if self.training else running
        if self.hparams.target_centering:
            normed = center_targets(normed, mean)
            # what a position-only predictor can do now: predict the removed mean, i.e. 0
            out["baseline"] = torch.zeros_like(normed)
        else:
            out["baseline"] = running.unsqueeze(0).expand_as(normed)
        out["targets"] = normed
        out["pooled_image"] = self.pool(img)
        ehr_pooled = ehr.mean(1) if ehr is not None else torch.zeros_like(out["pooled_image"])
        if ehr is not None:  # the cross-modal target: the whole EHR's pooled embedding
            out["pooled_ehr_target"] = nn.functional.layer_norm(ehr_pooled, ehr_pooled.shape[-1:])
        out["pooled_joint"] = torch.cat([out["pooled_image"], ehr_pooled], dim=1)
        return out

    # --- the JEPA computation --------------------------------------------------------------
    def sigreg_parts(self, batch: dict, context: torch.Tensor, n_ctx_img: int) -> list:
        """The per-modality embeddings ``[B_m, C]`` SIGReg regularises (``sigreg_input``)."""
        if self.hparams.sigreg_input == "full":
            parts = [self.pool(self.encoder(batch["image"], None, batch["ehr_missing"]))]
            if self.hparams.use_ehr:
                parts.append(self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1))
            return parts
        parts = [context[:, :n_ctx_img]]
        if self.hparams.use_ehr:
            parts.append(context[:, n_ctx_img:])
        dim = self.embed_dim
        # a modality absent from this rank's context: zero samples (it still joins the sync)
        return [
            p.mean(1) if p.shape[1] else context.new_zeros(0, dim) + context.sum() * 0
            for p in parts
        ]

    def sigreg_term(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """SIGReg on each modality's pooled embedding, averaged over the modalities present
        in the (global) batch; same directions on every rank (keyed on the step).

        Under DDP every rank runs the same all-reduces whatever its batch drew: masks (and so
        modality drop) differ between ranks, so a rank whose context has no image tokens
        contributes zero samples to the image statistic instead of skipping it (skipping
        would leave the other rank waiting in the collective). Validation does not reduce:
        ranks may hold one batch more or fewer there."""
        step = trainer.global_step if (trainer := self.attached_trainer()) else 0
        seed = 0 if not self.training else 1 + step
        dirs = sigreg_directions(
            self.embed_dim, self.hparams.sigreg_directions, seed, parts[0].device
        )
        reduce = self.loss_reduce_sum()
        synced = reduce is not None
        terms, present = [], []
        for z in parts:
            if not z.shape[0] and not synced:
                continue
            value, n = sigreg(
                z, dirs, self.hparams.sigreg_points, reduce_sum=reduce, return_n=True,
                standardize=self.hparams.sigreg_standardize,
            )  # fmt: skip
            terms.append(value)
            present.append(float(n >= 1))
        if not terms or not sum(present):
            return parts[0].sum() * 0.0
        return torch.stack(terms).sum() / sum(present)

    def jepa_losses(self, batch: dict, t: dict | None = None) -> dict[str, torch.Tensor]:
        """The within-scan JEPA losses of a single-scan batch with its masks; ``t``: the
        batch's :meth:`targets` when the caller has computed them already."""
        if any(k not in batch for k in MASK_KEYS):
            raise KeyError(
                "batch has no JEPA mask indices: the task's collate_hook() draws them, "
                "installed by the DataContract callback the task brings (configure_callbacks) "
                "in the data module's loaders or, without a `collate_hook` attribute there, at "
                "the start of each batch; a Trainer whose callbacks drop it gets no masks"
            )
        t = self.targets(batch) if t is None else t
        n_img = self.encoder.num_patches
        ctx_img, ctx_ehr = batch["ctx_image_idx"], batch["ctx_ehr_idx"]
        tgt_img_idx, tgt_ehr_idx = batch["tgt_image_idx"], batch["tgt_ehr_idx"]
        context = self.encoder(
            batch["image"] if ctx_img.shape[1] else None,
            batch["ehr"] if ctx_ehr.shape[1] else None,
            batch["ehr_missing"],
            image_keep=ctx_img,
            ehr_keep=ctx_ehr,
        )
        pred_img, pred_ehr = self.predictor(context, ctx_img, ctx_ehr, tgt_img_idx, tgt_ehr_idx)
        kind, reduce = self.hparams.loss, self.loss_reduce_sum()
        tgt_img = gather_tokens(t["targets"][:, :n_img], tgt_img_idx)
        base_img = gather_tokens(t["baseline"][:, :n_img], tgt_img_idx)
        # every mean over the target tokens of all ranks (their numbers differ: masks are drawn
        # per rank), so N ranks x B optimise what 1 process x N·B does
        loss_image = latent_regression_loss(pred_img, tgt_img, kind=kind, reduce_sum=reduce)
        out = {"loss_image": loss_image}
        with torch.no_grad():
            baseline = latent_regression_loss(base_img, tgt_img, kind=kind, reduce_sum=reduce)
            out["loss_vs_position_baseline"] = loss_image.detach() / baseline.clamp_min(1e-12)
        loss = loss_image
        # Under DDP a rank whose masks drew no EHR target still joins the EHR loss's sums.
        if tgt_ehr_idx.shape[1] or reduce is not None:
            tgt_ehr = gather_tokens(t["targets"][:, n_img:], tgt_ehr_idx)
            observed = ~torch.gather(batch["ehr_missing"], 1, tgt_ehr_idx)
            loss_ehr = latent_regression_loss(pred_ehr, tgt_ehr, observed, kind, reduce_sum=reduce)
            if tgt_ehr_idx.shape[1]:
                out["loss_ehr"] = loss_ehr
            loss = loss + self.hparams.ehr_loss_weight * loss_ehr
        parts = None
        if self.hparams.sigreg_weight > 0:
            parts = self.sigreg_parts(batch, context, ctx_img.shape[1])
            out["loss_sigreg"] = self.sigreg_term(parts)
            loss = loss + self.hparams.sigreg_weight * out["loss_sigreg"]
        if self.cross_predictor is not None:
            full = parts is not None and self.hparams.sigreg_input == "full"
            image = (
                parts[0]
                if full
                else self.pool(self.encoder(batch["image"], None, batch["ehr_missing"]))
            )
            pred = self.cross_predictor(image).unsqueeze(1)
            target = t["pooled_ehr_target"].unsqueeze(1)
            out["loss_cross_modal"] = latent_regression_loss(
                pred, target, kind=kind, reduce_sum=reduce
            )
            loss = loss + self.hparams.cross_modal_weight * out["loss_cross_modal"]
        if self.hparams.variance_weight > 0:
            out["loss_variance"] = variance_hinge(context.mean(1), reduce_sum=reduce)
            loss = loss + self.hparams.variance_weight * out["loss_variance"]
        out["loss"] = loss
        out["target_position_r2"] = t["target_position_r2"]
        out["pooled"] = t["pooled_image"].detach()
        out["pooled_joint"] = t["pooled_joint"].detach()
        return out

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        del generator  # the masks were drawn in the loader workers (collate_hook)
        return self.jepa_losses(batch)
