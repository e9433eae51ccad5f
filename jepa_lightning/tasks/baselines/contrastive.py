"""CLIP-style image <-> EHR contrastive pretraining (symmetric InfoNCE, learnable temperature)."""

from __future__ import annotations

import math

import torch
from torch import nn

from jepa_lightning.distributed import all_gather_cat
from jepa_lightning.losses import clip_loss
from jepa_lightning.tasks.ssl import SSLTask


class ImageEHRContrastive(SSLTask):
    """Pull each patient's image embedding towards their own EHR embedding and away from the
    other patients' in the batch (CLIP's symmetric InfoNCE).

    Both towers are the one shared :class:`MultimodalEncoder`, run once on the image tokens
    and once on the EHR tokens (the modality embeddings tell them apart), then mean-pooled
    and linearly projected per modality. Under DDP every rank's embeddings are gathered
    (the local rows keep their gradient), so each patient is contrasted with the whole
    global batch, as in CLIP: N ranks x B train exactly as one process x N·B. So the
    checkpoint's ``encoder`` has trained image
    *and* EHR paths and initialises ``DiagnosisTask`` for ``image``, ``ehr`` or
    ``image+ehr`` (the last sees both modalities in one sequence, which pretraining never
    did: finetune rather than probe it). The online probe reads the image embedding.

    Args:
        proj_dim: width of the joint embedding space.
        temperature: initial softmax temperature, learned as ``log(1/T)``. As in CLIP the
            *parameter* is clamped to ``[0, log(max_logit_scale)]`` after each optimizer step;
            a clamp inside the forward would zero its gradient for good once it passed.
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
        image = self.pool(self.encoder(batch["image"]))
        ehr = self.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
        scale = self.logit_scale.exp()
        image_emb, ehr_emb = self.image_proj(image), self.ehr_proj(ehr)
        if self.training:  # the global batch's negatives (validation batches may be uneven)
            image_emb, ehr_emb = all_gather_cat(image_emb), all_gather_cat(ehr_emb)
        loss = clip_loss(image_emb, ehr_emb, scale)
        return {"loss": loss, "logit_scale": scale.detach(), "pooled": image}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Clamp the learned temperature's parameter after the optimizer step (CLIP)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.hparams.max_logit_scale))
