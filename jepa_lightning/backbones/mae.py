"""MAE pieces: volume <-> patch voxels, and the light decoder that reconstructs hidden patches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from jepa_lightning.backbones.vit3d import (
    Block,
    Size3,
    as_size3,
    init_transformer_weights,
    sincos_pos_embed_3d,
)


def patchify_3d(volume: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """``[B, C, D, H, W] -> [B, N, pd * ph * pw * C]``, patches in the same raster order
    (z, y, x) as :class:`~jepa_lightning.backbones.vit3d.PatchEmbed3D`'s tokens, so patch
    ``n`` is what token ``n`` was embedded from."""
    b, c, d, h, w = volume.shape
    pd, ph, pw = as_size3(patch_size)
    if d % pd or h % ph or w % pw:
        raise ValueError(f"volume {(d, h, w)} is not tiled by patches {(pd, ph, pw)}")
    x = volume.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, gd, gh, gw, pd, ph, pw, C
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify_3d(
    patches: torch.Tensor, grid: Size3, patch_size: int | Sequence[int], channels: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify_3d`: ``[B, N, P] -> [B, C, D, H, W]`` (for pictures)."""
    pd, ph, pw = as_size3(patch_size)
    gd, gh, gw = grid
    b = patches.shape[0]
    x = patches.reshape(b, gd, gh, gw, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


class MAEDecoder(nn.Module):
    """Light MAE decoder: visible-token encodings + a shared mask token at every hidden
    position, fixed 3-D positions, a few narrow blocks, a linear map to patch voxels.

    ``forward(visible [B, K, C], keep [B, K]) -> [B, N, P]`` predictions for *every* patch
    (the loss scores only the hidden ones). The decoder is thrown away after pretraining.
    """

    def __init__(
        self,
        grid: Size3,
        embed_dim: int,
        patch_voxels: int,
        decoder_dim: int = 48,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.num_patches = grid[0] * grid[1] * grid[2]
        self.input_proj = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.register_buffer("pos", sincos_pos_embed_3d(grid, decoder_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.output_proj = nn.Linear(decoder_dim, patch_voxels)
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, _, _ = visible.shape
        x = self.mask_token.to(visible.dtype).expand(b, self.num_patches, -1).clone()
        proj = self.input_proj(visible)
        x = x.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), proj)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.output_proj(self.norm(x))
