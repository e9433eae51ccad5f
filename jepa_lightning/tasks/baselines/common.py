"""What the self-supervised baselines share: the online linear probe and collapse metrics.

Every baseline keeps its backbone as ``self.encoder`` (a :class:`MultimodalEncoder`, and
``self.target_encoder`` where the method has an EMA target), so that
``DiagnosisTask(init_from=...)`` loads its checkpoint key for key like a JEPA one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC

from jepa_lightning.collapse import effective_rank, mean_feature_std
from jepa_lightning.losses import masked_bce_with_logits
from jepa_lightning.masking import step_generator
from jepa_lightning.tasks.base import BaseTask


class SSLTask(BaseTask):
    """A pretraining task: subclasses build ``self.encoder`` and implement
    :meth:`ssl_losses`, returning ``{"loss": ..., "pooled": [B, C] features, ...}``.

    This class trains an online linear probe on the *detached* pooled features of the
    labelled scans (it never shapes the backbone), and logs ``val/probe_auroc``,
    ``val/effective_rank`` and ``val/feature_std`` each validation epoch: the same
    monitors as the JEPA task, so every method's best epoch is chosen the same way.
    Extra scalar entries of the loss dict are logged as ``train/<name>``/``val/<name>``.
    """

    def __init__(
        self, embed_dim: int, lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size
    ):
        super().__init__(lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size)
        self.probe = nn.Linear(embed_dim, 1)
        self.val_probe_auroc = BinaryAUROC()
        self._val_embeddings: list[torch.Tensor] = []

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
        for name, value in self._scalars(out).items():
            self.log(
                f"val/{name}",
                value,
                prog_bar=name == "loss",
                batch_size=len(batch["label"]),
                sync_dist=True,
            )
        pooled = out["pooled"].detach()
        labelled = ~torch.isnan(batch["label"])
        if labelled.any():
            prob = torch.sigmoid(self.probe(pooled).squeeze(-1))
            self.val_probe_auroc.update(prob[labelled], batch["label"][labelled].long())
        self._val_embeddings.append(pooled.float().cpu())

    def on_validation_epoch_end(self) -> None:
        if self.val_probe_auroc.update_count:
            self.log("val/probe_auroc", self.val_probe_auroc.compute(), prog_bar=True)
        self.val_probe_auroc.reset()
        if self._val_embeddings:
            z = torch.cat(self._val_embeddings)
            self.log("val/effective_rank", effective_rank(z))
            self.log("val/feature_std", mean_feature_std(z))
        self._val_embeddings.clear()
