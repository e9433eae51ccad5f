"""DiagnosisTask: malignancy from image, EHR or both; from scratch or from a JEPA checkpoint;
linear probe (frozen backbone) or full finetune."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from jepa_lightning.checkpoints import CheckpointMismatchError
from jepa_lightning.data_contract import NamesCohorts, has_capability
from jepa_lightning.losses import masked_bce_with_logits
from jepa_lightning.pretrained import architecture, load_pretrained_encoder
from jepa_lightning.tasks.base import BaseTask, decay_groups

log = logging.getLogger(__name__)


def binary_metrics() -> MetricCollection:
    """AUROC and AUPRC, updated with *float* 0/1 targets: under DDP torchmetrics stands in an
    empty float tensor for a rank that saw no sample of a split or cohort when it
    all-gathers, and a long target state on the other ranks would not match it (a gloo size
    mismatch). Targets are checked by the callers (labels are 0/1 by the data contract)."""
    return MetricCollection(
        {"auroc": BinaryAUROC(), "auprc": BinaryAveragePrecision(validate_args=False)}
    )


class DiagnosisTask(BaseTask):
    """Binary diagnosis (e.g. nodule malignancy) on the shared multimodal encoder.

    Args:
        modalities: what the model sees: ``image``, ``ehr`` or ``image+ehr``.
        init_from: a pretraining (MultimodalJEPA, MAE, MSN, ImageEHRContrastive) or
            DiagnosisTask checkpoint; its encoder (see ``init_from_encoder``) initialises the
            backbone, strictly (any missing/unexpected/mis-shaped weight is an error), and
            the EHR normalisation it was pretrained with is reused.
        init_from_encoder: which encoder of ``init_from``: ``auto`` (the EMA target encoder
            when the method has one, JEPA and MSN; else the encoder), ``target`` or
            ``context`` (the online/context encoder).
        freeze_backbone: linear probing: the backbone stays frozen and in eval mode.
        backbone_lr_mult: backbone LR as a fraction of the head's when finetuning.
        head_dropout: dropout before the linear head.
        **kwargs: the backbone (must match ``init_from``'s) and the optimizer
            (:class:`BaseTask`).
    """

    def __init__(
        self,
        modalities: Literal["image", "ehr", "image+ehr"] = "image+ehr",
        init_from: str | None = None,
        init_from_encoder: Literal["auto", "target", "context"] = "auto",
        freeze_backbone: bool = False,
        backbone_lr_mult: float = 1.0,
        head_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if modalities not in ("image", "ehr", "image+ehr"):
            raise ValueError(f"modalities must be image, ehr or image+ehr, got {modalities!r}")
        self.encoder = self.build_encoder()
        self._initialised_from: str | None = None
        self._warned: set[tuple] = set()
        if freeze_backbone:
            self.encoder.requires_grad_(False).eval()
        self.head = nn.Sequential(
            nn.LayerNorm(self.embed_dim), nn.Dropout(head_dropout), nn.Linear(self.embed_dim, 1)
        )
        metrics = binary_metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.val_loss = MeanMetric()  # synced at compute, so a rank without labels takes part
        self.val_positives = SumMetric()  # labelled positives / scans over all ranks
        self.val_labelled = SumMetric()
        self.test_metrics = nn.ModuleDict()  # per cohort, filled at setup from the data module
        self._one_cohort = False  # a data module that names no cohorts: every scan is "all"
        self.test_counts = nn.ModuleDict()
        self.test_positives = nn.ModuleDict()

    @property
    def uses_image(self) -> bool:
        return "image" in self.hparams.modalities

    @property
    def uses_ehr(self) -> bool:
        return "ehr" in self.hparams.modalities

    def initialise_from_checkpoint(self, path: str) -> dict[str, Any] | None:
        """Load the pretrained encoder strictly; return the data state it was trained with."""
        h = self.hparams
        expected = architecture(h.image_size, h.n_ehr_features, self.backbone)
        weights, data_state = load_pretrained_encoder(
            path, expected, h.get("init_from_encoder", "auto")
        )
        try:
            result = self.encoder.load_state_dict(weights, strict=False)
        except RuntimeError as err:  # mis-shaped tensors
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit the encoder: {err}"
            ) from err
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit the encoder "
                f"(init_from_encoder={self.hparams.get('init_from_encoder', 'auto')}): "
                f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
            )
        self._initialised_from = path
        log.info("backbone initialised from %s", path)
        return data_state

    def on_fit_start(self) -> None:
        # Loaded here, not in __init__, so a bad checkpoint raises its own error (the CLI
        # would wrap an __init__ error in a type-validation message); and after Lightning's
        # restore, so a resumed run (--ckpt_path) keeps its finetuned weights and does not
        # need the pretraining file any more.
        init_from = self.hparams.init_from
        if not init_from and self.hparams.freeze_backbone:
            log.warning(
                "freeze_backbone is set but init_from is not: probing a randomly initialised "
                "backbone (a 'random features' baseline); pass --model.init_args.init_from=CKPT"
            )
        if (
            not init_from
            or self.trainer.ckpt_path is not None
            or self._initialised_from == init_from
        ):
            return
        data_state = self.initialise_from_checkpoint(init_from)
        dm = getattr(self.trainer, "datamodule", None)
        if data_state is not None and hasattr(dm, "load_state_dict"):
            dm.load_state_dict(data_state)  # EHR coded as in pretraining

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if stage in ("test", "fit") and not len(self.test_metrics):
            named = has_capability(dm, NamesCohorts, "test metrics for one cohort, 'all'")
            cohorts = (dm.cohorts if named else None) or ["all"]
            self._one_cohort = cohorts == ["all"]
            for c in cohorts:
                self.test_metrics[c] = binary_metrics()
                self.test_counts[c] = SumMetric()
                self.test_positives[c] = SumMetric()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.freeze_backbone:
            self.encoder.eval()
        return self

    def param_groups(self) -> list[dict]:
        groups = decay_groups(self.head.named_parameters(), self.weight_decay)
        if not self.hparams.freeze_backbone:
            groups += decay_groups(
                self.encoder.named_parameters(), self.weight_decay, self.hparams.backbone_lr_mult
            )
        return groups

    def scan_features(self, batch: dict) -> torch.Tensor:
        """Mean-pooled encoder tokens of one scan per row (``image [N, 1, D, H, W]``, ``ehr`` /
        ``ehr_missing [N, F]``) over the modalities this model uses, ``[N, C]``; only the
        keys of those modalities are read."""
        tokens = self.encoder(
            batch["image"] if self.uses_image else None,
            batch["ehr"] if self.uses_ehr else None,
            batch["ehr_missing"] if self.uses_ehr else None,
        )
        return self.pool(tokens, self.encoder.num_patches if self.uses_image else 0)

    def features(self, batch: dict) -> torch.Tensor:
        """What the head sees, ``[B, C]``: here the scan's :meth:`scan_features` (a subclass
        such as the longitudinal task combines several scans' features)."""
        return self.scan_features(batch)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.features(batch)).squeeze(-1)

    def training_step(self, batch: dict, batch_idx: int):
        batch = self.training_batch(batch)  # an all-skipped batch: see BaseTask.empty_batch
        if batch is None:
            return None
        # the mean over the labelled scans of every rank (their numbers differ between ranks)
        loss = masked_bce_with_logits(self(batch), batch["label"], self.loss_reduce_sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _labelled(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch)
        mask = ~torch.isnan(batch["label"])
        return logits, mask, batch["label"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        logits, mask, label = self._labelled(batch)
        if mask.any():
            loss = masked_bce_with_logits(logits, label)
            self.val_loss.update(loss, weight=int(mask.sum()))
            self.val_metrics.update(torch.sigmoid(logits[mask]), label[mask].float())
            self.val_positives.update(label[mask].sum())
            self.val_labelled.update(mask.sum())

    def on_validation_epoch_end(self) -> None:
        # Decided on the count over all ranks, so every rank enters the same (all-gathering)
        # compute(), also a rank whose share of the split held no labelled scan.
        n = self.count_over_ranks(self.val_metrics["auroc"].update_count)
        if n:
            self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
            values = self.val_metrics.compute()
            n_pos = int(self.val_positives.compute())
            if self._one_class("the validation split", n_pos, self.val_labelled.compute()):
                values = {k: torch.full_like(v, float("nan")) for k, v in values.items()}
            self.log_dict(values, prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        self.val_loss.reset()
        self.val_positives.reset()
        self.val_labelled.reset()

    def _one_class(self, where: str, n_pos: int, n_scans: Any) -> bool:
        """True, with a warning naming ``where`` and its class counts, when the labelled scans
        are all of one class: AUROC is then undefined and logged as NaN (torchmetrics would
        report 0.0, which reads like a real figure)."""
        n = int(n_scans.item() if torch.is_tensor(n_scans) else n_scans)
        if 0 < n_pos < n:
            return False
        key = (where, n_pos, n)
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(
                f"{where} has {n_pos} positive and {n - n_pos} negative labelled scans: AUROC "
                "and AUPRC are undefined there and logged as NaN (not 0.0); add scans of the "
                "missing class or leave that cohort out"
            )
        return True

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        logits, mask, label = self._labelled(batch)
        prob = torch.sigmoid(logits)
        names = ["all"] * len(label) if self._one_cohort else batch["cohort"]
        for cohort in set(names):
            if cohort not in self.test_metrics:
                raise KeyError(
                    f"test batch has cohort {cohort!r}, unknown at setup ({list(self.test_metrics)})"
                )
            sel = mask & torch.tensor([c == cohort for c in names], device=mask.device)
            if sel.any():
                self.test_metrics[cohort].update(prob[sel], label[sel].float())
                self.test_counts[cohort].update(sel.sum())
                self.test_positives[cohort].update(label[sel].sum())

    def on_test_epoch_end(self) -> None:
        for cohort, metrics in self.test_metrics.items():
            # scans of this cohort over all ranks (SumMetric syncs): a rank that saw none of
            # them still joins the all-gather of the others' predictions
            n = self.test_counts[cohort].compute()
            if n > 0:
                n_pos = int(self.test_positives[cohort].compute())
                values = metrics.compute()
                if self._one_class(f"test cohort {cohort!r}", n_pos, n):
                    values = {k: torch.full_like(v, float("nan")) for k, v in values.items()}
                for name, value in values.items():
                    self.log(f"test/{cohort}/{name}", value, sync_dist=True)
                self.log(f"test/{cohort}/n_scans", n, sync_dist=True)
                self.log(f"test/{cohort}/n_positive", float(n_pos), sync_dist=True)
            metrics.reset()
            self.test_counts[cohort].reset()
            self.test_positives[cohort].reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Per-scan probability and the pooled backbone features the head sees (``embedding``,
        ``[B, C]``): what :class:`~jepa_lightning.callbacks.PredictionWriter` writes."""
        if not batch:
            return {}
        features = self.features(batch)
        return {
            "scan_id": batch["scan_id"],
            "patient_id": batch["patient_id"],
            "cohort": batch["cohort"],
            "label": batch["label"],
            "prob": torch.sigmoid(self.head(features).squeeze(-1)),
            "embedding": features,
        }
