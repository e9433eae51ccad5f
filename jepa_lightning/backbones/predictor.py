"""The narrow JEPA predictor: context tokens + position/modality-aware mask tokens -> predictions."""

from __future__ import annotations

import torch
from torch import nn

from jepa_lightning.backbones.multimodal_encoder import EHR, IMAGE
from jepa_lightning.backbones.vit3d import (
    Block,
    Size3,
    init_transformer_weights,
    sincos_pos_embed_3d,
)


class JEPAPredictor(nn.Module):
    """Predicts target-encoder outputs at the requested image positions and EHR features.

    Context tokens (image first, then EHR, as the encoder emits them) are projected to the
    narrow predictor width and get the predictor's own position/feature code again; each
    target becomes one shared mask token plus the code of *where* (3-D position) or *which*
    (EHR feature) it is, plus its modality embedding. All targets go through in one pass:
    mask tokens carry no content, so letting them attend to each other leaks nothing.
    """

    def __init__(
        self,
        grid: Size3,
        n_ehr_features: int,
        embed_dim: int,
        predictor_dim: int = 48,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.input_proj = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(predictor_dim))
        self.register_buffer(
            "image_pos", sincos_pos_embed_3d(grid, predictor_dim), persistent=False
        )
        self.ehr_identity = nn.Parameter(torch.randn(n_ehr_features, predictor_dim) * 0.02)
        self.modality_embed = nn.Parameter(torch.randn(2, predictor_dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(predictor_dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(predictor_dim)
        self.output_proj = nn.Linear(predictor_dim, embed_dim)
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _code(self, image_idx: torch.Tensor, ehr_idx: torch.Tensor) -> torch.Tensor:
        """Where/which code for image positions then EHR features, ``[B, Ki + Ke, P]``."""
        img = self.image_pos[image_idx] + self.modality_embed[IMAGE]
        ehr = self.ehr_identity[ehr_idx] + self.modality_embed[EHR]
        return torch.cat([img, ehr], dim=1)

    def forward(
        self,
        context: torch.Tensor,
        ctx_image_idx: torch.Tensor,
        ctx_ehr_idx: torch.Tensor,
        tgt_image_idx: torch.Tensor,
        tgt_ehr_idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns predictions ``([B, Ti, C], [B, Te, C])`` for image and EHR targets."""
        n_ctx = context.shape[1]
        if n_ctx != ctx_image_idx.shape[1] + ctx_ehr_idx.shape[1]:
            raise ValueError("context tokens and context indices disagree in length")
        ctx = self.input_proj(context) + self._code(ctx_image_idx, ctx_ehr_idx)
        targets = self.mask_token + self._code(tgt_image_idx, tgt_ehr_idx)
        x = torch.cat([ctx, targets], dim=1)
        for block in self.blocks:
            x = block(x)
        out = self.output_proj(self.norm(x[:, n_ctx:]))
        n_img = tgt_image_idx.shape[1]
        return out[:, :n_img], out[:, n_img:]
