"""3-D masked autoencoder (MAE): reconstruct the voxels of hidden patches from the visible ones."""

from __future__ import annotations

import math

import torch

from jepa_lightning.backbones.mae import MAEDecoder, patchify_3d
from jepa_lightning.losses import mae_loss
from jepa_lightning.masking import random_masks
from jepa_lightning.tasks.ssl import SSLTask


class MAE(SSLTask):
    """Image-only 3-D MAE on the shared encoder.

    The encoder sees only the visible patches (dropped tokens are gathered away before the
    first block, as in JEPA), a light decoder puts a mask token at every hidden position
    and predicts its voxels; the loss is the MSE on hidden patches only, against
    per-patch normalised voxels when ``norm_pix_loss`` (the MAE paper's better target).
    The checkpoint's ``encoder`` initialises ``DiagnosisTask`` (image modality); its EHR
    tokenizer is untrained.

    Args:
        mask_ratio: share of patches hidden from the encoder (MAE: 0.75).
        decoder_dim / decoder_depth / decoder_heads: the light decoder.
        norm_pix_loss: reconstruct per-patch normalised voxels instead of raw intensities.
        lr: peak learning rate (:class:`BaseTask`); 1.5e-3 here.
        **kwargs: ``reference_metrics`` (:class:`SSLTask`), the backbone and the optimizer
            (:class:`BaseTask`).
    """

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_dim: int = 48,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        lr: float = 1.5e-3,
        **kwargs,
    ):
        super().__init__(lr=lr, **kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = self.build_encoder()
        self.encoder.ehr.requires_grad_(False)  # image-only: no gradient would reach it
        self.n_keep = max(1, round(self.encoder.num_patches * (1.0 - mask_ratio)))
        patch_voxels = math.prod(self.encoder.vit.patch_embed.patch_size)
        self.decoder = MAEDecoder(
            self.encoder.grid, self.embed_dim, patch_voxels, decoder_dim, decoder_depth,
            decoder_heads,
        )  # fmt: skip
        self.init_monitors()

    def ssl_losses(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        image = batch["image"]
        keep, masked = random_masks(
            len(image), self.encoder.num_patches, self.n_keep, image.device, generator
        )
        visible = self.encoder(image, image_keep=keep)
        pred = self.decoder(visible, keep)
        patches = patchify_3d(image, self.backbone.patch_size)
        loss = mae_loss(
            pred, patches, masked, self.hparams.norm_pix_loss, reduce_sum=self.loss_reduce_sum()
        )
        with torch.no_grad():  # probe/collapse features: the full volume, as finetuning sees it
            pooled = self.pool(self.encoder(image))
        return {"loss": loss, "pooled": pooled}
