"""What the self-supervised baselines share: the online linear probe and collapse metrics.

Every baseline keeps its backbone as ``self.encoder`` (a :class:`MultimodalEncoder`, and
``self.target_encoder`` where the method has an EMA target), so that
``DiagnosisTask(init_from=...)`` loads its checkpoint key for key like a JEPA one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAUROC

from jepa_lightning.collapse import effective_rank, mean_feature_std
from jepa_lightning.losses import masked_bce_with_logits
from jepa_lightning.masking import step_generator
from jepa_lightning.tasks.base import BaseTask, OnlineProbe


class SSLTask(BaseTask):
    """A pretraining task: subclasses build ``self.encoder`` and implement
    :meth:`ssl_losses`, returning ``{"loss": ..., "pooled": [B, C] features, ...}``.

    This class trains an online linear probe on the *detached* pooled features of the
    labelled scans (it never shapes the backbone), and logs ``val/probe_auroc``,
    ``val/effective_rank`` and ``val/feature_std`` each validation epoch: the same
    monitors as the JEPA task, so every method's best epoch is chosen the same way.
    Extra scalar entries of the loss dict are logged as ``train/<name>``/``val/<name>``;
    a subclass lists the ones it returns in ``LOSS_KEYS``.

    Under DDP every validation monitor is a torchmetrics state synced at epoch end (AUROC
    on float targets, the embeddings in a ``CatMetric``, each loss in a ``MeanMetric``), and
    whether to compute one is decided on its update count summed over ranks
    (:meth:`BaseTask.count_over_ranks`). A rank whose share of the validation split holds no
    labelled scan therefore still joins the all-gather of the others: deciding per rank
    left the labelled rank waiting in a collective forever (issue 18).
    """

    #: scalar entries of :meth:`ssl_losses`' dict, each averaged over the validation epoch
    LOSS_KEYS: tuple[str, ...] = ("loss",)

    def __init__(
        self, embed_dim: int, lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size
    ):
        super().__init__(lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size)
        self.probe = OnlineProbe(embed_dim)
        self.embed_dim = embed_dim
        self.val_probe_auroc = BinaryAUROC()
        # flattened [B * C]: torchmetrics gathers a rank without samples as a 1-D empty tensor
        self.val_embeddings = CatMetric(nan_strategy="disable")
        self.val_losses = nn.ModuleDict({k: MeanMetric() for k in self.LOSS_KEYS})

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The method's losses; random views are drawn from ``generator`` (the global RNG
        when None, as in unit tests)."""
        raise NotImplementedError

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

    @staticmethod
    def _scalars(out: dict) -> dict[str, torch.Tensor]:
        """The scalar entries of a loss dict (``pooled`` and other tensors left out)."""
        return {
            name: value
            for name, value in out.items()
            if name != "pooled" and torch.is_tensor(value) and not value.ndim
        }

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every sample of the batch was skipped as bad input
            return None
        out = self.ssl_losses(batch, self._step_generator(batch, batch_idx))
        logits = self.probe(out["pooled"].detach()).squeeze(-1)
        probe_loss = masked_bce_with_logits(logits, batch["label"])
        bs = len(batch["label"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        diagnostics = {k: v for k, v in self._scalars(out).items() if k != "loss"}
        self.log_train_diagnostics({**diagnostics, "probe_loss": probe_loss}, bs)
        return out["loss"] + probe_loss

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
            self.val_losses[name].update(value.detach().float(), weight=bs)
        pooled = out["pooled"].detach()
        labelled = ~torch.isnan(batch["label"])
        if labelled.any():
            prob = torch.sigmoid(self.probe(pooled).squeeze(-1))
            # float targets: torchmetrics stands in an empty *float* tensor for a rank without
            # samples when it all-gathers; a long state elsewhere would not match it
            self.val_probe_auroc.update(prob[labelled], batch["label"][labelled].float())
            self.count_probe_labels(batch["label"][labelled])
        self.val_embeddings.update(pooled.float().flatten())

    def on_validation_epoch_end(self) -> None:
        # Every decision on counts over all ranks, so all ranks enter the same compute()s.
        # Computed values are then equal on every rank; sync_dist averages equal numbers.
        self.log_probe_auroc("val/probe_auroc", self.val_probe_auroc, prog_bar=True)
        self.val_probe_auroc.reset()
        self.reset_probe_label_counts()
        if self.count_over_ranks(self.val_embeddings.update_count):
            z = self.val_embeddings.compute().reshape(-1, self.embed_dim)
            self.log("val/effective_rank", effective_rank(z), sync_dist=True)
            self.log("val/feature_std", mean_feature_std(z), sync_dist=True)
        self.val_embeddings.reset()
        for name, metric in self.val_losses.items():
            if self.count_over_ranks(metric.update_count):
                self.log(f"val/{name}", metric.compute(), prog_bar=name == "loss", sync_dist=True)
            metric.reset()
