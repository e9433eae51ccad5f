"""JEPAContrastive: the multimodal JEPA plus CLIP's image <-> EHR InfoNCE, a named hybrid.

Why a separate method: on LIDC-IDRI the JEPA's frozen image features tie a random encoder's
when both are read at the lesion, while contrastive image-reading pretraining gains
(``tasks/README.md``, "Reading out the lesion"). Adding negatives to the JEPA (as C-JEPA,
MMCL and TIP do) asks how much of that gain a JEPA keeps when it also contrasts; it is
compared *beside* the pure JEPA (method ``jepa_contrastive`` in the studies) and never
stands in for it: the method named ``jepa`` has no negatives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jepa_lightning.distributed import all_gather_cat
from jepa_lightning.losses import clip_loss
from jepa_lightning.tasks.jepa import MultimodalJEPA


class JEPAContrastive(MultimodalJEPA):
    """:class:`MultimodalJEPA` whose loss adds ``contrastive_weight`` x CLIP's symmetric
    InfoNCE between each patient's pooled full-image and full-EHR embeddings (the same
    embeddings SIGReg regularises; under DDP the global batch's negatives, as in
    :class:`~jepa_lightning.tasks.ImageEHRContrastive`).

    Args:
        contrastive_weight: weight of the InfoNCE term next to the JEPA loss.
        proj_dim / temperature / max_logit_scale: CLIP's projections and learned temperature
            (the parameter is clamped after each optimizer step).
        **kwargs: :class:`MultimodalJEPA`'s arguments; ``use_ehr`` must stay on.
    """

    LOSS_KEYS = (*MultimodalJEPA.LOSS_KEYS, "loss_contrastive", "logit_scale")

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        proj_dim: int = 64,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not self.hparams.use_ehr:
            raise ValueError("JEPAContrastive contrasts image and EHR: use_ehr must be true")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.image_proj = nn.Linear(self.embed_dim, proj_dim)
        self.ehr_proj = nn.Linear(self.embed_dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def sigreg_parts(self, batch: dict, context: torch.Tensor, n_ctx_img: int) -> list:
        """SIGReg's embeddings, kept when they are the full ones, so the InfoNCE term reuses
        them instead of running the encoder twice more."""
        parts = super().sigreg_parts(batch, context, n_ctx_img)
        self._full_embeddings = parts if self.hparams.sigreg_input == "full" else None
        return parts

    def contrastive_term(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE between the pooled full-image and full-EHR embeddings, and the scale."""
        full = getattr(self, "_full_embeddings", None)
        self._full_embeddings = None
        if full is not None:
            image, ehr = full
        else:
            image = self.pool(self.encoder(batch["image"], None, batch["ehr_missing"]))
            ehr = self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
        image_emb, ehr_emb = self.image_proj(image), self.ehr_proj(ehr)
        if self.training:  # the global batch's negatives (validation batches may be uneven)
            image_emb, ehr_emb = all_gather_cat(image_emb), all_gather_cat(ehr_emb)
        scale = self.logit_scale.exp()
        return clip_loss(image_emb, ehr_emb, scale), scale

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        self._full_embeddings = None
        out = super().ssl_losses(batch, generator)
        out["loss_contrastive"], scale = self.contrastive_term(batch)
        out["logit_scale"] = scale.detach()
        out["loss"] = out["loss"] + self.hparams.contrastive_weight * out["loss_contrastive"]
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the EMA update
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))
