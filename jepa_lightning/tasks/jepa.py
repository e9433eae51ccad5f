"""MultimodalJEPA: predict, in latent space, what an EMA target encoder says about hidden parts
of a patient's CT and EHR, from the visible parts (image -> image, image -> EHR, EHR -> image).

What makes it learn (each measured on the quickstart cohort, README "Watching for collapse"):

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

import copy
import logging
from typing import Literal

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAUROC

from jepa_lightning.backbones import JEPAPredictor, MultimodalEncoder
from jepa_lightning.backbones.vit3d import gather_tokens
from jepa_lightning.collapse import effective_rank, mean_feature_std
from jepa_lightning.losses import (
    center_targets,
    latent_regression_loss,
    layer_norm_targets,
    masked_bce_with_logits,
    position_r2,
    sigreg,
    sigreg_directions,
    variance_hinge,
)
from jepa_lightning.masking import JEPAMaskCollator
from jepa_lightning.schedules import (
    ema_init_share,
    ema_momentum,
    ema_start_for_share,
    ema_update_,
)
from jepa_lightning.tasks.base import BaseTask, OnlineProbe
from jepa_lightning.tasks.references import encoder_references

log = logging.getLogger(__name__)

MASK_KEYS = ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx")
VAL_MEANS = (
    "loss",
    "loss_image",
    "loss_ehr",
    "loss_sigreg",
    "loss_vs_position_baseline",
    "target_position_r2",
)


class MultimodalJEPA(BaseTask):
    """Multimodal JEPA pretraining.

    Args:
        image_size: volume size (D, H, W); linked from the data module by the CLI.
        n_ehr_features: EHR vector length; linked from the data module by the CLI.
        patch_size / embed_dim / depth / num_heads / mlp_ratio: the shared encoder.
        predictor_dim / predictor_depth / predictor_heads: the narrow predictor.
        use_ehr: False gives image-only I-JEPA (EHR neither context nor target).
        n_blocks / block_scale / block_aspect / block_z_scale: 3-D target blocks (scale is
            the share of patches per block; z gets its own stretch).
        ehr_mask_ratio: share of EHR tokens that are targets in joint batches.
        p_image_only / p_ehr_only: probability that a batch drops the EHR (image -> EHR) or
            the image (EHR -> image) from the context.
        target_mode: ``per_modality`` (image targets from the target encoder on the image
            alone, EHR targets on the EHR alone) or ``joint`` (one pass over both, the
            original form: image targets then carry EHR content).
        target_centering: subtract the per-position mean from the layer-normed targets and
            layer-norm again (:func:`~jepa_lightning.losses.center_targets`). In training the
            mean is the batch's own (averaged over ranks), so no per-position component is
            left for a content-free predictor; in evaluation it is a running mean of those.
        target_center_momentum: EMA momentum of that running mean (bias-corrected, so the
            first batches are not pulled towards 0).
        ema_momentum_start / ema_momentum_end: EMA momentum, linear over optimizer steps.
            ``auto`` picks the largest start (<= 0.996) that leaves < 5 % of the random init
            in the target after 10 % of the steps (0.996 suits 100k-step runs, not 1k);
            ``train/ema_init_share`` logs the share actually left.
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
        loss: ``smooth_l1`` | ``l1`` | ``l2`` on the targets, in fp32.
        residual_rescale: I-JEPA's init, residual branch outputs scaled by 1/sqrt(2 * depth).
        reference_metrics: measure the random-init encoder at step 0 (``ref/*``) and the
            final one at the end (``final/*``): image-only offline probe (logistic
            regression fitted on labelled training scans, scored on labelled validation
            scans), effective rank and feature spread of validation embeddings.
        grad_checkpointing: trade compute for activation memory in the encoders.
        compile: ``torch.compile`` the transformer blocks (encoders and predictor) in
            ``configure_model``; checkpoints are unchanged.
        lr ... weight_decay_end: optimizer and schedules (:class:`BaseTask`).
    """

    def __init__(
        self,
        image_size: int | list[int] = 32,
        n_ehr_features: int = 32,
        patch_size: int | list[int] = 8,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        predictor_dim: int = 48,
        predictor_depth: int = 2,
        predictor_heads: int = 4,
        use_ehr: bool = True,
        n_blocks: int = 4,
        block_scale: tuple[float, float] = (0.15, 0.2),
        block_aspect: tuple[float, float] = (0.75, 1.5),
        block_z_scale: tuple[float, float] = (0.75, 1.5),
        ehr_mask_ratio: tuple[float, float] = (0.3, 0.6),
        p_image_only: float = 0.2,
        p_ehr_only: float = 0.2,
        target_mode: Literal["per_modality", "joint"] = "per_modality",
        target_centering: bool = True,
        target_center_momentum: float = 0.99,
        ema_momentum_start: float | Literal["auto"] = "auto",
        ema_momentum_end: float = 1.0,
        ehr_loss_weight: float = 1.0,
        sigreg_weight: float = 0.0,
        sigreg_directions: int = 64,
        sigreg_points: int = 17,
        sigreg_input: Literal["full", "context"] = "full",
        sigreg_standardize: bool = False,
        variance_weight: float = 0.0,
        loss: str = "smooth_l1",
        residual_rescale: bool = False,
        reference_metrics: bool = True,
        grad_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 1.5e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        base_batch_size: int | None = None,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        weight_decay_end: float | None = None,
    ):
        super().__init__(
            lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size, lr_schedule,
            decay_fraction, weight_decay_end,
        )  # fmt: skip
        if sigreg_input not in ("full", "context"):
            raise ValueError(f"sigreg_input must be 'full' or 'context', got {sigreg_input!r}")
        if target_mode not in ("per_modality", "joint"):
            raise ValueError(f"target_mode must be 'per_modality' or 'joint', got {target_mode!r}")
        self.save_hyperparameters()
        self.encoder = MultimodalEncoder(
            image_size, patch_size, n_ehr_features, embed_dim, depth, num_heads, mlp_ratio,
            grad_checkpointing, residual_rescale,
        )  # fmt: skip
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = JEPAPredictor(
            self.encoder.grid,
            n_ehr_features,
            embed_dim,
            predictor_dim,
            predictor_depth,
            predictor_heads,
        )
        # Online linear probes on detached target features: the image-only one is what
        # checkpoint selection uses (val/probe_auroc); the joint one sees image and EHR.
        self.probe = OnlineProbe(embed_dim)
        self.probe_joint = OnlineProbe(2 * embed_dim)
        self.val_probe_auroc = BinaryAUROC()
        self.val_probe_auroc_joint = BinaryAUROC()
        n_tokens = self.encoder.num_patches + n_ehr_features
        # Running per-position mean of the layer-normed targets (image positions, then EHR
        # features) and the number of batches in it; saved, so a resume keeps centring alike.
        self.register_buffer("target_mean", torch.zeros(n_tokens, embed_dim))
        self.register_buffer("target_mean_batches", torch.zeros((), dtype=torch.long))
        # Product of the EMA momenta so far: the share of the random init left in the target.
        self.register_buffer("ema_init_share", torch.ones((), dtype=torch.float64))
        self._last_ema_step = -1
        # Pooled image-only validation embeddings of every rank (CatMetric all-gathers at
        # compute), so the collapse metrics describe the whole split, not rank 0's share.
        self.val_embeddings = CatMetric(nan_strategy="disable")
        # Means over all ranks' batches; a rank whose batches drew no EHR target (modality
        # drop) has no ``loss_ehr`` but still joins the sync.
        self.val_losses = nn.ModuleDict({k: MeanMetric() for k in VAL_MEANS})

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
            p_image_only=h.p_image_only,
            p_ehr_only=h.p_ehr_only,
            use_ehr=h.use_ehr,
            rank=self.global_rank,
        )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "collate_hook"):
            dm.collate_hook = self.mask_collator()

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_encoder.eval()  # the target never runs in training mode
        return self

    # --- DDP helpers ---------------------------------------------------------------------------
    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self._world() > 1:
            return self.trainer.strategy.reduce(x.clone(), reduce_op="mean")
        return x

    def _sum_over_ranks_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks with a backward (each rank gets the gradient of the global value;
        DDP's averaging then gives the gradient of the statistic of the global batch)."""
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(x)

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
        """Fold this batch's per-position mean (averaged over ranks) into the running mean;
        returns the batch mean."""
        batch_mean = self._mean_over_ranks(normed.float().mean(0))
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
        out["pooled_image"] = img.mean(1)
        ehr_pooled = ehr.mean(1) if ehr is not None else torch.zeros_like(out["pooled_image"])
        out["pooled_joint"] = torch.cat([out["pooled_image"], ehr_pooled], dim=1)
        return out

    # --- the JEPA computation --------------------------------------------------------------
    def sigreg_parts(self, batch: dict, context: torch.Tensor, n_ctx_img: int) -> list:
        """The per-modality embeddings ``[B_m, C]`` SIGReg regularises (``sigreg_input``)."""
        if self.hparams.sigreg_input == "full":
            parts = [self.encoder(batch["image"], None, batch["ehr_missing"]).mean(1)]
            if self.hparams.use_ehr:
                parts.append(self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1))
            return parts
        parts = [context[:, :n_ctx_img]]
        if self.hparams.use_ehr:
            parts.append(context[:, n_ctx_img:])
        dim = self.hparams.embed_dim
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
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = 0 if not self.training else 1 + step
        dirs = sigreg_directions(
            self.hparams.embed_dim, self.hparams.sigreg_directions, seed, parts[0].device
        )
        synced = self._world() > 1 and self.training
        reduce = self._sum_over_ranks_differentiable if synced else None
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

    def jepa_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if any(k not in batch for k in MASK_KEYS):
            raise KeyError(
                "batch has no JEPA mask indices: the data module must apply the task's "
                "collate_hook (CTEHRDataModule does; a custom one needs a `collate_hook` attribute)"
            )
        t = self.targets(batch)
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
        kind = self.hparams.loss
        tgt_img = gather_tokens(t["targets"][:, :n_img], tgt_img_idx)
        base_img = gather_tokens(t["baseline"][:, :n_img], tgt_img_idx)
        out = {"loss_image": latent_regression_loss(pred_img, tgt_img, kind=kind)}
        with torch.no_grad():
            baseline = latent_regression_loss(base_img, tgt_img, kind=kind)
            out["loss_vs_position_baseline"] = out["loss_image"].detach() / baseline.clamp_min(
                1e-12
            )
        loss = out["loss_image"]
        if tgt_ehr_idx.shape[1]:
            tgt_ehr = gather_tokens(t["targets"][:, n_img:], tgt_ehr_idx)
            observed = ~torch.gather(batch["ehr_missing"], 1, tgt_ehr_idx)
            out["loss_ehr"] = latent_regression_loss(pred_ehr, tgt_ehr, observed, kind=kind)
            loss = loss + self.hparams.ehr_loss_weight * out["loss_ehr"]
        if self.hparams.sigreg_weight > 0:
            parts = self.sigreg_parts(batch, context, ctx_img.shape[1])
            out["loss_sigreg"] = self.sigreg_term(parts)
            loss = loss + self.hparams.sigreg_weight * out["loss_sigreg"]
        if self.hparams.variance_weight > 0:
            out["loss_variance"] = variance_hinge(context.mean(1))
            loss = loss + self.hparams.variance_weight * out["loss_variance"]
        out["loss"] = loss
        out["target_position_r2"] = t["target_position_r2"]
        out["pooled_image"] = t["pooled_image"].detach()
        out["pooled_joint"] = t["pooled_joint"].detach()
        return out

    def probe_losses(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        image = masked_bce_with_logits(self.probe(out["pooled_image"]).squeeze(-1), labels)
        joint = masked_bce_with_logits(self.probe_joint(out["pooled_joint"]).squeeze(-1), labels)
        return image + joint

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every sample of the batch was skipped as bad input
            return None
        out = self.jepa_losses(batch)
        probe_loss = self.probe_losses(out, batch["label"])
        bs = len(batch["image"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        keys = ("loss_image", "loss_ehr", "loss_sigreg", "loss_variance")
        diagnostics = {k: out[k] for k in keys if k in out}
        diagnostics["loss_vs_position_baseline"] = out["loss_vs_position_baseline"]
        diagnostics["probe_loss"] = probe_loss
        diagnostics["ema_momentum"] = self.current_momentum()
        diagnostics["ema_init_share"] = float(self.ema_init_share)
        if self.weight_decay_end is not None:
            diagnostics["weight_decay"] = self.current_weight_decay()
        self.log_train_diagnostics(diagnostics, bs)
        return out["loss"] + probe_loss

    # --- EMA -----------------------------------------------------------------------------------
    def ema_start(self) -> float:
        """The start momentum: the configured one, or the ``auto`` one for this run length."""
        start, end = self.hparams.ema_momentum_start, self.hparams.ema_momentum_end
        if start != "auto":
            return float(start)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if getattr(self, "_auto_ema", (None, None))[0] != total:
            self._auto_ema = (total, ema_start_for_share(total, 0.05, 0.1, end))
        return self._auto_ema[1]

    def current_momentum(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return ema_momentum(
            self.trainer.global_step, total, self.ema_start(), self.hparams.ema_momentum_end
        )

    def on_train_start(self) -> None:
        self._last_ema_step = self.trainer.global_step  # also right after a resume
        h = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        start = self.ema_start()
        share = ema_init_share(max(1, -(-total // 10)), total, start, h.ema_momentum_end)
        log.info(
            "EMA %.4g -> %.4g over %d steps: %.1f %% of the random init left in the target "
            "after 10 %% of the steps",
            start, h.ema_momentum_end, total, 100 * share,
        )  # fmt: skip
        if share > 0.05 + 1e-9:
            log.warning(
                "the EMA target keeps %.0f %% of its random init after 10 %% of the run; lower "
                "ema_momentum_start (the finetuning starts from the target encoder)",
                100 * share,
            )
        if h.reference_metrics and self.trainer.global_step == 0:
            self.log_references("ref")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per real optimizer step: with gradient accumulation global_step only moves
        # on the step that updated the weights.
        step = self.trainer.global_step
        if step == self._last_ema_step:
            return
        self._last_ema_step = step
        momentum = self.current_momentum()
        ema_update_(
            list(self.target_encoder.parameters()), list(self.encoder.parameters()), momentum
        )
        self.ema_init_share *= momentum

    def on_train_end(self) -> None:
        if self.hparams.reference_metrics:
            self.log_references("final")

    def log_references(self, prefix: str) -> None:
        """Offline image-only measures of the current target encoder (``ref`` at step 0:
        the random-init reference; ``final`` after training), to the logger and the log."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        values = encoder_references(self.target_encoder, dm, self.device)
        values = {f"{prefix}/{k}": v for k, v in values.items()}
        log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.reference_values = {**getattr(self, "reference_values", {}), **values}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)

    # --- validation: JEPA loss, online probe AUROC, collapse metrics --------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        out = self.jepa_losses(batch)
        bs = len(batch["image"])
        for key, metric in self.val_losses.items():
            if key in out and torch.isfinite(out[key]):
                metric.update(out[key].detach().float(), weight=bs)
        labelled = ~torch.isnan(batch["label"])
        if labelled.any():
            # float targets: torchmetrics stands in an empty *float* tensor for a rank without
            # samples when it all-gathers, and a long state on the other ranks would not match
            y = batch["label"][labelled].float()
            prob = torch.sigmoid(self.probe(out["pooled_image"]).squeeze(-1))
            self.val_probe_auroc.update(prob[labelled], y)
            prob_joint = torch.sigmoid(self.probe_joint(out["pooled_joint"]).squeeze(-1))
            self.val_probe_auroc_joint.update(prob_joint[labelled], y)
            self.count_probe_labels(y)
        # flattened: torchmetrics gathers a rank without samples as a 1-D empty tensor
        self.val_embeddings.update(out["pooled_image"].float().flatten())

    def on_validation_epoch_end(self) -> None:
        # Counts summed over ranks: every rank enters the same compute() (all-gathers), also
        # a rank whose share held no labelled scan. The computed values are then the same on
        # every rank; sync_dist averages identical numbers (exact) and keeps Lightning quiet.
        self.log_probe_auroc("val/probe_auroc", self.val_probe_auroc, prog_bar=True)
        self.log_probe_auroc("val/probe_auroc_joint", self.val_probe_auroc_joint)
        self.val_probe_auroc.reset()
        self.val_probe_auroc_joint.reset()
        self.reset_probe_label_counts()
        if self.count_over_ranks(self.val_embeddings.update_count):
            z = self.val_embeddings.compute().reshape(-1, self.hparams.embed_dim)
            self.log("val/effective_rank", effective_rank(z), sync_dist=True)
            self.log("val/feature_std", mean_feature_std(z), sync_dist=True)
        self.val_embeddings.reset()
        for key, metric in self.val_losses.items():
            if self.count_over_ranks(metric.update_count):
                self.log(f"val/{key}", metric.compute(), prog_bar=key == "loss", sync_dist=True)
            metric.reset()
