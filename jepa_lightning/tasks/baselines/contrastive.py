"""CLIP-style image <-> EHR contrastive pretraining (symmetric InfoNCE, learnable temperature)."""

from __future__ import annotations

import math

import torch
from torch import nn

from jepa_lightning.losses import clip_loss
from jepa_lightning.tasks.ssl import SSLTask


class ImageEHRContrastive(SSLTask):
    """Pull each patient's image embedding towards their own EHR embedding and away from the
    other patients' in the batch (CLIP's symmetric InfoNCE).

    Both towers are the one shared :class:`MultimodalEncoder`, run once on the image tokens
    and once on the EHR tokens (the modality embeddings tell them apart), then mean-pooled
    and linearly projected per modality. So the checkpoint's ``encoder`` has trained image
    *and* EHR paths and initialises ``DiagnosisTask`` for ``image``, ``ehr`` or
    ``image+ehr`` (the last sees both modalities in one sequence, which pretraining never
    did: finetune rather than probe it). The online probe reads the image embedding.

    Args:
        proj_dim: width of the joint embedding space.
        temperature: initial softmax temperature (learned as ``logit_scale = 1/T``,
            clamped at ``max_logit_scale`` as in CLIP).
        **kwargs: ``reference_metrics`` (:class:`SSLTask`), the backbone and the optimizer
            (:class:`BaseTask`).
    """

    LOSS_KEYS = ("loss", "logit_scale")

    def __init__(
        self,
        proj_dim: int = 64,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.encoder = self.build_encoder()
        self.image_proj = nn.Linear(self.embed_dim, proj_dim)
        self.ehr_proj = nn.Linear(self.embed_dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.init_monitors()

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        del generator  # CLIP draws no random views
        image = self.encoder(batch["image"]).mean(1)
        ehr = self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
        scale = self.logit_scale.exp().clamp(max=self.hparams.max_logit_scale)
        loss = clip_loss(self.image_proj(image), self.ehr_proj(ehr), scale)
        return {"loss": loss, "logit_scale": scale.detach(), "pooled": image}
