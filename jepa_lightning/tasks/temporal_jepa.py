"""JEPA across time: from a patient's earlier scan (+ its EHR, + the time elapsed), predict
what the EMA target encoder says about the later scan -- beside the within-scan JEPA.

Why: a nodule's history (growth between scans) carries diagnostic signal one scan lacks.
Predicting the later scan's latents from the earlier one makes the encoder represent what
changes over time, which the within-scan objective never asks for.

It trains on patient sequences (the data module's ``sequence: true``, ``max_scans >= 2``):
the within-scan losses are :class:`MultimodalJEPA`'s on each patient's latest scan (masks
drawn in the loader workers for the latest scans); the across-time loss pairs the latest
scan with the one before it. A patient with one scan contributes only the within-scan
losses (the single-scan objective), so a cohort of single scans trains exactly as JEPA's
objective on those scans. The checkpoint's ``encoder`` / ``target_encoder`` load into any
finetuning task like a JEPA one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jepa_lightning.backbones.temporal import DEFAULT_TIME_SCALES, TimeEmbedding
from jepa_lightning.backbones.vit3d import gather_tokens
from jepa_lightning.losses import latent_regression_loss
from jepa_lightning.masking import SequenceMaskCollator
from jepa_lightning.tasks.jepa import MASK_KEYS, MultimodalJEPA
from jepa_lightning.tasks.longitudinal import SEQUENCE_KEYS, empty_sequence_batch


def latest_scan(batch: dict) -> dict:
    """The single-scan view of a sequence batch: each patient's latest scan (index S-1),
    with the batch's masks and labels."""
    view = {k: batch[k] for k in (*MASK_KEYS, "label") if k in batch}
    view["image"] = batch["image"][:, -1]
    view["ehr"] = batch["ehr"][:, -1]
    view["ehr_missing"] = batch["ehr_missing"][:, -1]
    return view


class TemporalJEPA(MultimodalJEPA):
    """Multimodal JEPA with an across-time objective on patient sequences.

    Args:
        across_time_weight: weight of the across-time loss next to the within-scan losses.
        across_time_ehr: also predict the later scan's EHR targets (observed features only).
        time_scales: periods (days) of the elapsed-time code added to the earlier scan's
            context tokens (:class:`~jepa_lightning.backbones.temporal.TimeEmbedding`).
        **kwargs: :class:`MultimodalJEPA`'s arguments (masks, targets, SIGReg, EMA,
            backbone, optimizer).
    """

    LOSS_KEYS = (*MultimodalJEPA.LOSS_KEYS, "loss_across_time", "pairs_share")

    def __init__(
        self,
        across_time_weight: float = 1.0,
        across_time_ehr: bool = True,
        time_scales: Sequence[float] = DEFAULT_TIME_SCALES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if across_time_weight < 0:
            raise ValueError(f"across_time_weight must be >= 0, got {across_time_weight}")
        self.time_embed = TimeEmbedding(self.embed_dim, time_scales)

    def collate_hook(self) -> SequenceMaskCollator:
        return SequenceMaskCollator(self.mask_collator())

    def check_sequence_batch(self, batch: dict) -> None:
        if batch["image"].ndim != 6 or any(k not in batch for k in SEQUENCE_KEYS):
            raise KeyError(
                "TemporalJEPA trains on patient sequences: set data.init_args.sequence: true "
                "(and max_scans >= 2) so each batch holds image [B, S, 1, D, H, W], scan_mask "
                "and scan_times"
            )

    def across_time_loss(self, batch: dict, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of predicting the latest scan's target latents (its target blocks, and
        its observed EHR features) from the scan before it plus the time elapsed; and the
        share of patients that have an earlier scan."""
        has_prev = batch["scan_mask"][:, -2] if batch["scan_mask"].shape[1] > 1 else None
        zero = t["targets"].sum() * 0.0
        reduce = self.loss_reduce_sum()
        if has_prev is None or (reduce is None and not bool(has_prev.any())):
            return zero, zero.detach()
        # Under DDP a rank without a pair still runs (on zero rows) to join the loss's sums.
        rows = has_prev.nonzero().squeeze(1)
        n_img, n_ehr = self.encoder.num_patches, self.hparams.n_ehr_features
        use_ehr = self.hparams.use_ehr
        prev_ehr = batch["ehr"][rows, -2] if use_ehr else None
        context = self.encoder(batch["image"][rows, -2], prev_ehr, batch["ehr_missing"][rows, -2])
        elapsed = -batch["scan_times"][rows, -2]  # days from the earlier scan to the latest
        context = context + self.time_embed(elapsed)[:, None, :].to(context.dtype)
        b, device = len(rows), context.device
        ctx_img = torch.arange(n_img, device=device).expand(b, -1)
        ctx_ehr = torch.arange(n_ehr if use_ehr else 0, device=device).expand(b, -1)
        tgt_img = batch["tgt_image_idx"][rows]
        tgt_ehr = (
            torch.arange(n_ehr, device=device).expand(b, -1)
            if use_ehr and self.hparams.across_time_ehr
            else ctx_ehr[:, :0]
        )
        pred_img, pred_ehr = self.predictor(context, ctx_img, ctx_ehr, tgt_img, tgt_ehr)
        targets = t["targets"][rows]
        kind = self.hparams.loss
        loss = latent_regression_loss(
            pred_img, gather_tokens(targets[:, :n_img], tgt_img), kind=kind, reduce_sum=reduce
        )
        if tgt_ehr.shape[1]:
            observed = ~batch["ehr_missing"][rows, -1]
            target_ehr = gather_tokens(targets[:, n_img:], tgt_ehr)
            loss = loss + self.hparams.ehr_loss_weight * latent_regression_loss(
                pred_ehr, target_ehr, observed, kind=kind, reduce_sum=reduce
            )
        share = has_prev.float().mean() if len(has_prev) else zero
        return loss, share.detach()

    def empty_batch(self) -> dict:
        """A sequence batch of zero patients with empty masks."""
        return empty_sequence_batch(super().empty_batch())

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        del generator  # masks come from the loader workers (collate_hook)
        self.check_sequence_batch(batch)
        latest = latest_scan(batch)
        t = self.targets(latest)
        out = self.jepa_losses(latest, t)
        loss_time, share = self.across_time_loss(batch, t)
        out["loss_across_time"] = loss_time
        out["pairs_share"] = share
        out["loss"] = out["loss"] + self.hparams.across_time_weight * loss_time
        return out
