"""CLIP-style image <-> EHR contrastive pretraining (symmetric InfoNCE, learnable temperature)."""

from __future__ import annotations

import math

import torch
from torch import nn

from jepa_lightning.backbones import MultimodalEncoder
from jepa_lightning.losses import clip_loss
from jepa_lightning.tasks.baselines.common import SSLTask


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
        image_size / n_ehr_features: linked from the data module by the CLI.
        patch_size / embed_dim / depth / num_heads / mlp_ratio: the shared encoder.
        proj_dim: width of the joint embedding space.
        temperature: initial softmax temperature (learned as ``logit_scale = 1/T``,
            clamped at ``max_logit_scale`` as in CLIP).
        lr ... base_batch_size: optimizer and schedule (see ``BaseTask``).
    """

    LOSS_KEYS = ("loss", "logit_scale")

    def __init__(
        self,
        image_size: int | list[int] = 32,
        n_ehr_features: int = 32,
        patch_size: int | list[int] = 8,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        proj_dim: int = 64,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        base_batch_size: int | None = None,
    ):
        super().__init__(
            embed_dim, lr, weight_decay, warmup_fraction, min_lr_ratio, base_batch_size
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters()
        self.encoder = MultimodalEncoder(
            image_size, patch_size, n_ehr_features, embed_dim, depth, num_heads, mlp_ratio
        )
        self.image_proj = nn.Linear(embed_dim, proj_dim)
        self.ehr_proj = nn.Linear(embed_dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        del generator  # CLIP draws no random views
        image = self.encoder(batch["image"]).mean(1)
        ehr = self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
        scale = self.logit_scale.exp().clamp(max=self.hparams.max_logit_scale)
        loss = clip_loss(self.image_proj(image), self.ehr_proj(ehr), scale)
        return {"loss": loss, "logit_scale": scale.detach(), "pooled": image}
