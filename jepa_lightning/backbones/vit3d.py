"""A 3-D Vision Transformer whose encoder only ever sees the tokens it is asked to keep.

Layout conventions: volumes are ``[B, C, D, H, W]`` (D = slices, z), the patch grid is
``(gd, gh, gw)`` and tokens are numbered in raster order ``z * gh * gw + y * gw + x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Size3 = tuple[int, int, int]


def as_size3(value: int | Sequence[int]) -> Size3:
    """Accept ``32`` or ``[32, 32, 16]`` wherever a 3-D size is configured."""
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected an int or three ints (D, H, W), got {value!r}")
    return value  # type: ignore[return-value]


def patch_grid(img_size: int | Sequence[int], patch_size: int | Sequence[int]) -> Size3:
    """Number of patches per axis; refuses sizes that patches do not tile exactly."""
    img, patch = as_size3(img_size), as_size3(patch_size)
    for axis, (i, p) in enumerate(zip(img, patch, strict=True)):
        if i % p:
            raise ValueError(
                f"image size {img} is not divisible by patch size {patch} on axis {'DHW'[axis]}: "
                "choose an image_size that is a multiple of patch_size"
            )
    return (img[0] // patch[0], img[1] // patch[1], img[2] // patch[2])


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin-cos code of integer positions, ``[N] -> [N, dim]`` (dim even)."""
    if dim % 2:
        raise ValueError(f"sin-cos dimension must be even, got {dim}")
    omega = 1.0 / (10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2)))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed_3d(grid: Size3, dim: int) -> torch.Tensor:
    """Fixed 3-D positions for a ``(gd, gh, gw)`` grid, ``[gd*gh*gw, dim]``, raster order.

    Each axis gets its own share of the channels so that grids with D != H != W are coded
    faithfully (a cube-root trick on the token count would not be).
    """
    # Split dim into three even parts; z gets whatever is left so the sum is exact.
    per_axis = 2 * (dim // 6)
    dims = (dim - 2 * per_axis, per_axis, per_axis)
    if min(dims) <= 0 or any(d % 2 for d in dims):
        raise ValueError(f"embedding dimension {dim} too small for 3-D sin-cos positions")
    zz, yy, xx = torch.meshgrid(
        torch.arange(grid[0]), torch.arange(grid[1]), torch.arange(grid[2]), indexing="ij"
    )
    parts = [sincos_1d(c.reshape(-1), d) for c, d in zip((zz, yy, xx), dims, strict=True)]
    return torch.cat(parts, dim=1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, k]]`` for ``tokens [B, N, C]`` and ``index [B, K]`` -> ``[B, K, C]``."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(x: torch.Tensor, patch_size: Size3) -> torch.Tensor:
    """``[B, C, D, H, W] -> [B, N, C * pd * ph * pw]``: each row one patch, raster order of the
    patch grid, voxels in the order of a ``Conv3d`` weight (channel, z, y, x)."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch_size
    n = (d // pd) * (h // ph) * (w // pw)  # explicit: a batch of 0 (an empty DDP rank) has no -1
    x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, n, c * pd * ph * pw)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3-D patches -> tokens, so a token depends on its own voxels only:
    dropping a token later removes every trace of its voxels.

    The weights are those of a ``Conv3d`` with kernel = stride = patch (checkpoints and
    MONAI-style weights load unchanged), but the forward is the equivalent GEMM over
    flattened patches: with non-overlapping patches a convolution *is* one matrix product,
    and on CPU oneDNN's 3-D convolution and its backward measured 1.1-2x slower than that
    single GEMM (experiments/benchmarks/README.md). Same result up to float summation order.
    """

    def __init__(self, patch_size: int | Sequence[int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = as_size3(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patchify(x, self.patch_size), weight, self.proj.bias)  # [B, N, C]


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection on SDPA (flash/mem-efficient
    kernels where the device has them)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def compile_blocks(module: nn.Module) -> int:
    """Compile, in place, every transformer :class:`Block` inside ``module``; returns how many.

    ``nn.Module.compile`` keeps parameter names, so state dicts and checkpoints are the same
    as without it. Blocks rather than whole encoders: the number of tokens changes from batch
    to batch (mask sizes) and modality drop changes what is encoded at all, which would
    recompile a whole-model graph, while a block is the hot, shape-regular part whose
    elementwise tail (LayerNorm, bias, GELU, residual) is what a compiler fuses. The token
    dimension is compiled dynamic for the same reason.
    """
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal linears, unit LayerNorms: the ViT recipe the JEPA papers use."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d):
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def rescale_residual_branches_(blocks: Sequence[Block]) -> None:
    """I-JEPA's init fix: divide the output projections of block ``i`` (attention ``proj``
    and the MLP's last linear) by ``sqrt(2 * (i + 1))``, so each residual branch adds less
    variance the deeper it sits and the residual stream does not grow with depth at init."""
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp[-1].weight.div_(math.sqrt(2.0 * (i + 1)))


class VisionTransformer3D(nn.Module):
    """ViT over a ``[B, C, D, H, W]`` volume.

    ``forward(x, keep)`` encodes only the tokens listed in ``keep [B, K]`` (raster indices):
    the patches are embedded, fixed 3-D sin-cos positions added, the kept tokens gathered,
    and only those go through the transformer, so the cost falls with the mask ratio.
    ``residual_rescale`` applies :func:`rescale_residual_branches_` after the ViT init.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 32,
        patch_size: int | Sequence[int] = 8,
        in_chans: int = 1,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
        residual_rescale: bool = False,
    ):
        super().__init__()
        self.img_size = as_size3(img_size)
        self.grid = patch_grid(self.img_size, patch_size)
        self.num_patches = math.prod(self.grid)
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_3d(self.grid, embed_dim)[None], persistent=False
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        init_transformer_weights(self)
        if residual_rescale:
            rescale_residual_branches_(self.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions, ``[B, N, C]``, before any transformer block."""
        if tuple(x.shape[-3:]) != self.img_size:
            raise ValueError(
                f"volume of spatial size {tuple(x.shape[-3:])} given to a ViT built for "
                f"{self.img_size}: set the data's image_size and the model's to the same value"
            )
        return self.patch_embed(x) + self.pos_embed

    def encode_tokens(
        self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the transformer blocks and final norm on already-embedded tokens."""
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(
                    block, tokens, attn_mask, use_reentrant=False
                )
            else:
                tokens = block(tokens, attn_mask)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(x)
        if keep is not None:
            tokens = gather_tokens(tokens, keep)
        return self.encode_tokens(tokens)
