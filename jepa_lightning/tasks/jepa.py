"""MultimodalJEPA: predict, in latent space, what an EMA target encoder says about hidden parts
of a patient's CT and EHR, from the visible parts (image -> image, image -> EHR, EHR -> image)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAUROC

from jepa_lightning.backbones import JEPAPredictor, MultimodalEncoder
from jepa_lightning.backbones.vit3d import gather_tokens
from jepa_lightning.collapse import effective_rank, mean_feature_std
from jepa_lightning.losses import (
    latent_regression_loss,
    layer_norm_targets,
    masked_bce_with_logits,
    variance_hinge,
)
from jepa_lightning.masking import JEPAMaskCollator
from jepa_lightning.schedules import ema_momentum, ema_update_
from jepa_lightning.tasks.base import BaseTask

MASK_KEYS = ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx")


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
        ema_momentum_start / ema_momentum_end: EMA momentum, linear over optimizer steps.
        ehr_loss_weight: weight of the EHR-target loss next to the image-target loss.
        variance_weight: weight of a VICReg variance hinge on the per-sample pooled context
            embeddings (0 = pure JEPA). Small cohorts can collapse to position-only tokens
            (watch ``val/feature_std``); this term keeps samples apart.
        loss: ``smooth_l1`` | ``l1`` | ``l2`` on layer-normed targets, in fp32.
        grad_checkpointing: trade compute for activation memory in the encoders.
        compile: ``torch.compile`` the transformer blocks (encoders and predictor) in
            ``configure_model``; checkpoints are unchanged. Worth it on GPUs; on CPU the
            GEMMs dominate and the one-off compile takes minutes (README: Performance).
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
        ema_momentum_start: float = 0.996,
        ema_momentum_end: float = 1.0,
        ehr_loss_weight: float = 1.0,
        variance_weight: float = 0.0,
        loss: str = "smooth_l1",
        grad_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 1.5e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        base_batch_size: int | None = None,
    ):
        super().__init__(lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size)
        self.save_hyperparameters()
        self.encoder = MultimodalEncoder(
            image_size, patch_size, n_ehr_features, embed_dim, depth, num_heads, mlp_ratio,
            grad_checkpointing,
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
        self.probe = nn.Linear(embed_dim, 1)  # online linear probe on detached target features
        self.val_probe_auroc = BinaryAUROC()
        self._last_ema_step = -1
        # Pooled validation embeddings of every rank (CatMetric all-gathers at compute), so
        # the collapse metrics describe the whole split, not rank 0's share.
        self.val_embeddings = CatMetric(nan_strategy="disable")
        # Means over all ranks' batches; a rank whose batches drew no EHR target (modality
        # drop) has no ``loss_ehr`` but still joins the sync.
        self.val_losses = nn.ModuleDict(
            {k: MeanMetric() for k in ("loss", "loss_image", "loss_ehr")}
        )

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

    # --- the JEPA computation --------------------------------------------------------------
    @torch.no_grad()
    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer-normed target-encoder outputs at the image and EHR target positions, and the
        pooled (un-normed) embedding of the whole patient for the probe."""
        ehr = batch["ehr"] if self.hparams.use_ehr else None
        hidden = self.target_encoder(batch["image"], ehr, batch["ehr_missing"])
        n_img = self.encoder.num_patches
        normed = layer_norm_targets(hidden)
        tgt_img = gather_tokens(normed[:, :n_img], batch["tgt_image_idx"])
        tgt_ehr = (
            gather_tokens(normed[:, n_img:], batch["tgt_ehr_idx"]) if ehr is not None else None
        )
        return tgt_img, tgt_ehr, hidden.mean(1)

    def jepa_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if any(k not in batch for k in MASK_KEYS):
            raise KeyError(
                "batch has no JEPA mask indices: the data module must apply the task's "
                "collate_hook (CTEHRDataModule does; a custom one needs a `collate_hook` attribute)"
            )
        tgt_img, tgt_ehr, pooled = self.targets(batch)
        ctx_img, ctx_ehr = batch["ctx_image_idx"], batch["ctx_ehr_idx"]
        context = self.encoder(
            batch["image"] if ctx_img.shape[1] else None,
            batch["ehr"] if ctx_ehr.shape[1] else None,
            batch["ehr_missing"],
            image_keep=ctx_img,
            ehr_keep=ctx_ehr,
        )
        tgt_ehr_idx = batch["tgt_ehr_idx"]
        pred_img, pred_ehr = self.predictor(
            context, ctx_img, ctx_ehr, batch["tgt_image_idx"], tgt_ehr_idx
        )
        out = {"loss_image": latent_regression_loss(pred_img, tgt_img, kind=self.hparams.loss)}
        loss = out["loss_image"]
        if tgt_ehr_idx.shape[1]:
            observed = ~torch.gather(batch["ehr_missing"], 1, tgt_ehr_idx)
            out["loss_ehr"] = latent_regression_loss(
                pred_ehr, tgt_ehr, observed, kind=self.hparams.loss
            )
            loss = loss + self.hparams.ehr_loss_weight * out["loss_ehr"]
        if self.hparams.variance_weight > 0:
            out["loss_variance"] = variance_hinge(context.mean(1))
            loss = loss + self.hparams.variance_weight * out["loss_variance"]
        out["loss"] = loss
        out["pooled"] = pooled.detach()
        return out

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every sample of the batch was skipped as bad input
            return None
        out = self.jepa_losses(batch)
        probe_loss = masked_bce_with_logits(self.probe(out["pooled"]).squeeze(-1), batch["label"])
        bs = len(batch["image"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        diagnostics = {k: out[k] for k in ("loss_image", "loss_ehr", "loss_variance") if k in out}
        diagnostics["probe_loss"] = probe_loss
        diagnostics["ema_momentum"] = self.current_momentum()
        self.log_train_diagnostics(diagnostics, bs)
        return out["loss"] + probe_loss

    def current_momentum(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        h = self.hparams
        return ema_momentum(
            self.trainer.global_step, total, h.ema_momentum_start, h.ema_momentum_end
        )

    def on_train_start(self) -> None:
        self._last_ema_step = self.trainer.global_step  # also right after a resume

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per real optimizer step: with gradient accumulation global_step only moves
        # on the step that updated the weights.
        step = self.trainer.global_step
        if step == self._last_ema_step:
            return
        self._last_ema_step = step
        ema_update_(
            list(self.target_encoder.parameters()),
            list(self.encoder.parameters()),
            self.current_momentum(),
        )

    # --- validation: JEPA loss, online probe AUROC, collapse metrics --------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        out = self.jepa_losses(batch)
        bs = len(batch["image"])
        for key, metric in self.val_losses.items():
            if key in out:
                metric.update(out[key].detach().float(), weight=bs)
        labelled = ~torch.isnan(batch["label"])
        if labelled.any():
            prob = torch.sigmoid(self.probe(out["pooled"]).squeeze(-1))
            # float targets: torchmetrics stands in an empty *float* tensor for a rank without
            # samples when it all-gathers, and a long state on the other ranks would not match
            self.val_probe_auroc.update(prob[labelled], batch["label"][labelled].float())
        # flattened: torchmetrics gathers a rank without samples as a 1-D empty tensor
        self.val_embeddings.update(out["pooled"].float().flatten())

    def on_validation_epoch_end(self) -> None:
        # Counts summed over ranks: every rank enters the same compute() (all-gathers), also
        # a rank whose share held no labelled scan. The computed values are then the same on
        # every rank; sync_dist averages identical numbers (exact) and keeps Lightning quiet.
        if self.count_over_ranks(self.val_probe_auroc.update_count):
            self.log(
                "val/probe_auroc", self.val_probe_auroc.compute(), prog_bar=True, sync_dist=True
            )
        self.val_probe_auroc.reset()
        if self.count_over_ranks(self.val_embeddings.update_count):
            z = self.val_embeddings.compute().reshape(-1, self.hparams.embed_dim)
            self.log("val/effective_rank", effective_rank(z), sync_dist=True)
            self.log("val/feature_std", mean_feature_std(z), sync_dist=True)
        self.val_embeddings.reset()
        for key, metric in self.val_losses.items():
            if self.count_over_ranks(metric.update_count):
                self.log(f"val/{key}", metric.compute(), prog_bar=key == "loss", sync_dist=True)
            metric.reset()
