"""The base of every self-supervised pretraining task: online probes, collapse monitors and
random-init references, all DDP-safe, so every method's epochs are watched (and its best
epoch chosen) the same way.

Every method keeps its backbone as ``self.encoder`` (a :class:`MultimodalEncoder`, and
``self.target_encoder`` where it has an EMA target, see :mod:`.momentum`), so that
``DiagnosisTask(init_from=...)`` loads any method's checkpoint key for key.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAUROC

from jepa_lightning.collapse import collapse_measures
from jepa_lightning.data_contract import SplitDatasets, has_capability
from jepa_lightning.losses import masked_bce_with_logits
from jepa_lightning.masking import step_generator
from jepa_lightning.tasks.base import BaseTask
from jepa_lightning.tasks.probe import OnlineProbe
from jepa_lightning.tasks.references import encoder_references

log = logging.getLogger(__name__)


class SSLTask(BaseTask):
    """A pretraining task. A subclass builds ``self.encoder``, calls :meth:`init_monitors`
    once its modules exist, and implements :meth:`ssl_losses`, returning ``{"loss": ...,
    "pooled": [B, C] image features, ...}`` (and ``"pooled_joint"`` when it asked for a
    joint probe).

    Online probes are fitted on the *detached* pooled features of the labelled scans (they
    never shape the backbone): ``val/probe_auroc`` (image features; what checkpoint
    selection uses) and, where a method provides image + EHR features, ``val/probe_auroc_joint``.
    ``val/rankme`` (uncentred, as RankMe is defined: catches a point collapse),
    ``val/centred_rank`` (dimensional collapse), ``val/spread_share`` and ``val/feature_std``
    describe the validation embeddings (:mod:`jepa_lightning.collapse`).
    Scalar entries of the loss dict are logged as ``train/<name>`` (on logger steps) and
    averaged over the validation epoch as ``val/<name>``; a subclass lists them in
    ``LOSS_KEYS``.

    Under DDP every validation monitor is a torchmetrics state synced at epoch end (AUROC
    on float targets, embeddings in a ``CatMetric``, losses in ``MeanMetric``s) and every
    decision to compute one is taken on counts summed over ranks
    (:meth:`BaseTask.count_over_ranks`): a rank whose share of the validation split holds
    no labelled scan still joins the others' all-gather (deciding per rank deadlocks).

    Args:
        reference_metrics: measure the random-init encoder at step 0 (``ref/*``) and the
            final one at the end (``final/*``): image-only offline probe (logistic
            regression fitted on labelled training scans, scored on labelled validation
            scans), effective rank and feature spread of the validation embeddings -- so
            "collapsed" has a scale.
        **kwargs: the encoder and optimizer arguments of :class:`BaseTask`.
    """

    #: scalar entries of :meth:`ssl_losses`' dict, each averaged over the validation epoch
    LOSS_KEYS: tuple[str, ...] = ("loss",)
    #: entries of the step output that are features, not losses
    FEATURE_KEYS = ("pooled", "pooled_joint")

    def __init__(self, reference_metrics: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.reference_metrics = reference_metrics

    def init_monitors(self, joint_probe: bool = False) -> None:
        """Build the probes and monitor states. Called by the subclass after its own modules,
        so that their random initialisation does not depend on the monitors'."""
        dim = self.embed_dim
        self.probe = OnlineProbe(dim)
        self.probe_joint = OnlineProbe(2 * dim) if joint_probe else None
        self.val_probe_auroc = BinaryAUROC()
        self.val_probe_auroc_joint = BinaryAUROC() if joint_probe else None
        # flattened [B * C]: torchmetrics gathers a rank without samples as a 1-D empty tensor
        self.val_embeddings = CatMetric(nan_strategy="disable")
        # a rank whose batches lack a loss (e.g. no EHR target drawn) still joins the sync
        self.val_losses = nn.ModuleDict({k: MeanMetric() for k in self.LOSS_KEYS})

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The method's losses; random views are drawn from ``generator`` (the global RNG
        when None, as in unit tests)."""
        raise NotImplementedError

    def evaluation_encoder(self) -> nn.Module:
        """The encoder a finetuning run would start from: the EMA target where there is one."""
        return getattr(self, "target_encoder", self.encoder)

    def _step_generator(self, batch: dict, batch_idx: int) -> torch.Generator:
        # Training and validation keys differ (validation runs at a fixed global_step).
        offset = 0 if self.training else 1 << 40
        return step_generator(
            torch.initial_seed(),
            self.global_rank,
            self.global_step + offset,
            batch_idx,
            batch["image"].device,
        )

    def _scalars(self, out: dict) -> dict[str, torch.Tensor]:
        """The scalar entries of a loss dict (features and other tensors left out)."""
        return {
            name: value
            for name, value in out.items()
            if name not in self.FEATURE_KEYS and torch.is_tensor(value) and not value.ndim
        }

    def probe_loss(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        """The online probes' BCE over the labelled scans of the (global) batch."""
        reduce = self.loss_reduce_sum()
        logits = self.probe(out["pooled"].detach()).squeeze(-1)
        loss = masked_bce_with_logits(logits, labels, reduce)
        if self.probe_joint is not None:
            joint = self.probe_joint(out["pooled_joint"].detach()).squeeze(-1)
            loss = loss + masked_bce_with_logits(joint, labels, reduce)
        return loss

    def extra_diagnostics(self) -> dict[str, torch.Tensor | float]:
        """Values a subclass logs beside its losses on logger steps (e.g. the EMA momentum)."""
        if self.weight_decay_end is not None:
            return {"weight_decay": self.current_weight_decay()}
        return {}

    def training_step(self, batch: dict, batch_idx: int):
        batch = self.training_batch(batch)  # an all-skipped batch: see BaseTask.empty_batch
        if batch is None:
            return None
        out = self.ssl_losses(batch, self._step_generator(batch, batch_idx))
        probe_loss = self.probe_loss(out, batch["label"])
        bs = len(batch["label"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        diagnostics = {k: v for k, v in self._scalars(out).items() if k != "loss"}
        diagnostics["probe_loss"] = probe_loss
        self.log_train_diagnostics({**diagnostics, **self.extra_diagnostics()}, bs)
        return out["loss"] + probe_loss

    # --- references: the random-init encoder at step 0, the trained one at the end ---------
    def on_train_start(self) -> None:
        if self.reference_metrics and self.trainer.global_step == 0:
            self.log_references("ref")

    def on_train_end(self) -> None:
        if self.reference_metrics:
            self.log_references("final")

    def log_references(self, prefix: str) -> None:
        """Offline image-only measures of :meth:`evaluation_encoder`, to the loggers and the
        log (every rank computes them on the whole split, see ``references``)."""
        dm = getattr(self.trainer, "datamodule", None)
        skipped = "the reference monitors ref/* and final/* (offline probe, rank) are skipped"
        if not has_capability(dm, SplitDatasets, skipped):
            return
        values = encoder_references(self.evaluation_encoder(), dm, self.device, pool=self.pool)
        values = {f"{prefix}/{k}": v for k, v in values.items()}
        log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.reference_values = {**getattr(self, "reference_values", {}), **values}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)

    # --- validation: losses, online probes, collapse metrics --------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        out = self.ssl_losses(batch, self._step_generator(batch, batch_idx))
        bs = len(batch["label"])
        for name, value in self._scalars(out).items():
            if name not in self.val_losses:
                raise KeyError(
                    f"{type(self).__name__}.ssl_losses returned {name!r}, which is not in "
                    f"LOSS_KEYS {self.LOSS_KEYS}: add it there so every rank averages it"
                )
            if torch.isfinite(value):
                self.val_losses[name].update(value.detach().float(), weight=bs)
        pooled = out["pooled"].detach()
        labelled = ~torch.isnan(batch["label"])
        if labelled.any():
            # float targets: torchmetrics stands in an empty *float* tensor for a rank without
            # samples when it all-gathers; a long state elsewhere would not match it
            y = batch["label"][labelled].float()
            prob = torch.sigmoid(self.probe(pooled).squeeze(-1))
            self.val_probe_auroc.update(prob[labelled], y)
            if self.probe_joint is not None:
                joint = self.probe_joint(out["pooled_joint"].detach()).squeeze(-1)
                self.val_probe_auroc_joint.update(torch.sigmoid(joint)[labelled], y)
            self.count_probe_labels(y)
        self.val_embeddings.update(pooled.float().flatten())

    def on_validation_epoch_end(self) -> None:
        # Every decision on counts over all ranks, so all ranks enter the same compute()s.
        # Computed values are then equal on every rank; sync_dist averages equal numbers.
        self.log_probe_auroc("val/probe_auroc", self.val_probe_auroc, prog_bar=True)
        self.val_probe_auroc.reset()
        if self.val_probe_auroc_joint is not None:
            self.log_probe_auroc("val/probe_auroc_joint", self.val_probe_auroc_joint)
            self.val_probe_auroc_joint.reset()
        self.reset_probe_label_counts()
        if self.count_over_ranks(self.val_embeddings.update_count):
            z = self.val_embeddings.compute().reshape(-1, self.embed_dim)
            for name, value in collapse_measures(z).items():
                self.log(f"val/{name}", value, sync_dist=True)
        self.val_embeddings.reset()
        for name, metric in self.val_losses.items():
            if self.count_over_ranks(metric.update_count):
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "loss", sync_dist=True)
            metric.reset()
