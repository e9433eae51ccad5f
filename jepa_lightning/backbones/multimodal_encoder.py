"""The shared multimodal encoder: image tokens and EHR tokens in one transformer.

Every task (JEPA pretraining, diagnosis finetuning, baselines) uses this one module, so a
pretrained state dict loads into a finetuning model key for key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from jepa_lightning.backbones.ehr import EHRTokenizer
from jepa_lightning.backbones.presets import Backbone, as_backbone
from jepa_lightning.backbones.vit3d import VisionTransformer3D, gather_tokens

IMAGE, EHR = 0, 1  # modality ids, shared with the predictor


class MultimodalEncoder(nn.Module):
    """Encodes any subset of {image tokens, EHR tokens} of a patient.

    ``forward(image, ehr, ehr_missing, image_keep, ehr_keep)`` returns ``[B, K_img + K_ehr, C]``
    with the image tokens first. A modality that is ``None`` (or whose keep index has zero
    columns) contributes no token: that is how modality drop and single-modality
    finetuning run through the same weights.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 32,
        n_ehr_features: int = 32,
        backbone: str | Backbone | Mapping[str, Any] = "micro",
        grad_checkpointing: bool = False,
        residual_rescale: bool = False,
    ):
        """``backbone``: the architecture as one object (a preset name, a :class:`Backbone`
        or its dict), so its five fields are named in one place; the data decides the sizes."""
        super().__init__()
        b = as_backbone(backbone)
        self.backbone = b
        self.vit = VisionTransformer3D(
            image_size, patch_size=b.patch_size, in_chans=1, embed_dim=b.embed_dim,
            depth=b.depth, num_heads=b.num_heads, mlp_ratio=b.mlp_ratio,
            grad_checkpointing=grad_checkpointing, residual_rescale=residual_rescale,
        )  # fmt: skip
        self.ehr = EHRTokenizer(n_ehr_features, b.embed_dim)
        self.modality_embed = nn.Parameter(torch.randn(2, b.embed_dim) * 0.02)
        self.embed_dim = b.embed_dim

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.vit.grid

    @property
    def num_patches(self) -> int:
        return self.vit.num_patches

    @property
    def n_ehr_features(self) -> int:
        return self.ehr.n_features

    def tokens(
        self,
        image: torch.Tensor | None = None,
        ehr: torch.Tensor | None = None,
        ehr_missing: torch.Tensor | None = None,
        image_keep: torch.Tensor | None = None,
        ehr_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded (not yet encoded) tokens of the kept positions, image first."""
        parts = []
        if image is not None and (image_keep is None or image_keep.shape[1] > 0):
            img = self.vit.embed(image) + self.modality_embed[IMAGE]
            parts.append(img if image_keep is None else gather_tokens(img, image_keep))
        if ehr is not None and (ehr_keep is None or ehr_keep.shape[1] > 0):
            tok = self.ehr(ehr, ehr_missing) + self.modality_embed[EHR]
            parts.append(tok if ehr_keep is None else gather_tokens(tok, ehr_keep))
        if not parts:
            raise ValueError("the encoder was given no token: pass an image, an EHR vector or both")
        return torch.cat(parts, dim=1)

    def forward(
        self,
        image: torch.Tensor | None = None,
        ehr: torch.Tensor | None = None,
        ehr_missing: torch.Tensor | None = None,
        image_keep: torch.Tensor | None = None,
        ehr_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.vit.encode_tokens(self.tokens(image, ehr, ehr_missing, image_keep, ehr_keep))
