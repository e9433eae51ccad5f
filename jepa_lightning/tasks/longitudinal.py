"""LongitudinalDiagnosisTask: diagnosis from a patient's scans over time.

The shared encoder embeds each real scan (+ its EHR, per ``modalities``) exactly as
:class:`~jepa_lightning.tasks.diagnosis.DiagnosisTask` embeds one scan; a continuous time
embedding of each scan's distance to the latest is added; a small temporal transformer
runs over the patient's scans and the head reads the latest one. Everything else
(``init_from`` any single-scan checkpoint, ``freeze_backbone``, metrics per cohort,
predictions) is DiagnosisTask's.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from jepa_lightning.backbones.temporal import DEFAULT_TIME_SCALES, TemporalEncoder, TimeEmbedding
from jepa_lightning.tasks.base import decay_groups
from jepa_lightning.tasks.diagnosis import DiagnosisTask

SEQUENCE_KEYS = ("scan_mask", "scan_times")


def empty_sequence_batch(batch: dict, slots: int = 2) -> dict:
    """A single-scan batch of zero samples (:meth:`BaseTask.empty_batch`) as a sequence batch
    of zero patients with ``slots`` scan positions each (any number serves zero patients)."""
    for key in ("image", "ehr", "ehr_missing"):
        batch[key] = batch[key].unsqueeze(1).expand(-1, slots, *batch[key].shape[1:])
    device = batch["image"].device
    batch["scan_mask"] = torch.zeros(0, slots, dtype=torch.bool, device=device)
    batch["scan_times"] = torch.zeros(0, slots, device=device)
    return batch


class LongitudinalDiagnosisTask(DiagnosisTask):
    """Binary diagnosis at a patient's latest scan from the patient's scans over time.

    Takes the sequence batches of ``CTEHRDataModule(sequence=true)``: ``image [B, S, 1, D,
    H, W]``, ``ehr`` / ``ehr_missing [B, S, F]``, ``scan_mask [B, S]`` (True = a real scan,
    left-padded so the latest is at ``S - 1``), ``scan_times [B, S]`` (days relative to the
    latest scan) and ``label [B]`` (the latest scan's). Only the real scans go through the
    encoder (padded positions cost nothing and never reach it); their mean-pooled tokens,
    plus :class:`~jepa_lightning.backbones.temporal.TimeEmbedding` of ``scan_times``, go
    through :class:`~jepa_lightning.backbones.temporal.TemporalEncoder` (attention keys
    restricted to real scans) and the head reads its output at the latest scan.

    ``init_from`` loads the encoder from any single-scan pretraining (or DiagnosisTask)
    checkpoint as DiagnosisTask does; the time embedding and temporal transformer start
    fresh. ``freeze_backbone`` freezes the encoder (in eval mode) and trains the time
    embedding, the temporal transformer and the head: a probe of frozen per-scan features
    (no longer a *linear* one). They train at the head's LR; ``backbone_lr_mult`` is the
    encoder's.

    Args:
        temporal_depth: transformer blocks over the scans.
        temporal_heads: their attention heads (must divide the backbone width).
        time_scales: periods in days of the sin-cos time features.
        history: ``false`` gives the cross-sectional baseline in the same code and data:
            only the latest scan is encoded and goes through the (same) time embedding,
            temporal transformer and head, so the two differ in the history alone (the same
            as ``max_scans: 1`` data).
        **kwargs: :class:`~jepa_lightning.tasks.diagnosis.DiagnosisTask`'s arguments
            (``modalities``, ``init_from``, ``freeze_backbone``, ...), the backbone and the
            optimizer.
    """

    def __init__(
        self,
        temporal_depth: int = 2,
        temporal_heads: int = 4,
        time_scales: Sequence[float] = DEFAULT_TIME_SCALES,
        history: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hparams["time_scales"] = [float(s) for s in time_scales]  # plain list in hparams
        self.time_embed = TimeEmbedding(self.embed_dim, time_scales)
        self.temporal = TemporalEncoder(
            self.embed_dim, temporal_depth, temporal_heads, self.backbone.mlp_ratio
        )

    def param_groups(self) -> list[dict]:
        temporal = chain(
            self.time_embed.named_parameters(prefix="time_embed"),
            self.temporal.named_parameters(prefix="temporal"),
        )
        return super().param_groups() + decay_groups(temporal, self.weight_decay)

    def empty_batch(self) -> dict:
        return empty_sequence_batch(super().empty_batch())

    def _per_scan_keys(self) -> list[str]:
        return (["image"] if self.uses_image else []) + (
            ["ehr", "ehr_missing"] if self.uses_ehr else []
        )

    def _check_sequence_batch(self, batch: dict) -> None:
        missing = [k for k in SEQUENCE_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"LongitudinalDiagnosisTask needs sequence batches (no {missing} in this "
                "batch): set data.init_args.sequence: true (and max_scans)"
            )
        b, s = batch["scan_mask"].shape
        for key in self._per_scan_keys():
            if tuple(batch[key].shape[:2]) != (b, s):
                raise ValueError(
                    f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected [B, S, ...] "
                    f"= [{b}, {s}, ...] like scan_mask"
                )

    def features(self, batch: dict) -> torch.Tensor:
        """The temporal transformer's output at the latest scan, ``[B, C]`` (what the head
        and ``predict``'s ``embedding`` see)."""
        self._check_sequence_batch(batch)
        keys = self._per_scan_keys()
        mask, times = batch["scan_mask"].bool(), batch["scan_times"]
        per_scan = {k: batch[k] for k in keys}
        if not self.hparams.history:  # the latest scan alone (always real)
            mask, times = mask[:, -1:], times[:, -1:]
            per_scan = {k: v[:, -1:] for k, v in per_scan.items()}
        b, s = mask.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # real scans among the B * S positions
        z = self.scan_features(
            {k: v.flatten(0, 1).index_select(0, real) for k, v in per_scan.items()}
        )
        tokens = z.new_zeros(b * s, z.shape[-1]).index_copy(0, real, z).view(b, s, z.shape[-1])
        tokens = tokens + self.time_embed(times).to(tokens.dtype)
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding: a defined zero token
        return self.temporal(tokens, mask)
