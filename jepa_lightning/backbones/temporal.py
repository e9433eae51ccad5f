"""Over a patient's scans: a continuous time embedding and a small temporal transformer.

A patient's scans arrive as ``[B, S, C]`` tokens (one pooled encoder embedding per scan,
left-padded so the latest scan sits at ``S - 1``) with ``scan_mask [B, S]`` (True = a real
scan) and ``scan_times [B, S]`` (days relative to the latest scan, ``<= 0``).
:class:`TimeEmbedding` codes each scan's distance to the latest; :class:`TemporalEncoder`
lets the latest token attend to the earlier ones and returns it. Plain ``nn.Module`` s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from jepa_lightning.backbones.vit3d import Block, init_transformer_weights

#: periods (days) of the sin-cos time features: a month to ten years, so every gap an
#: archive holds (weeks to years) is resolved and none aliases onto another within 10 years
DEFAULT_TIME_SCALES = (30.0, 90.0, 365.0, 1095.0, 3650.0)


class TimeEmbedding(nn.Module):
    """Continuous time code: ``[..., ] days -> [..., dim]``.

    The time in years (``days / 365``) is coded by ``sin`` and ``cos`` at one angular
    frequency per period of ``time_scales`` (``2 pi * 365 / period`` per year), and a linear
    layer maps those ``2 * len(time_scales)`` features to the token width. Zero days (the
    latest scan) is a proper code, not all zeros (every ``cos`` is 1 there); which positions
    are padding is the mask's business, not the time code's.
    """

    def __init__(self, dim: int, time_scales: Sequence[float] = DEFAULT_TIME_SCALES):
        super().__init__()
        scales = [float(s) for s in time_scales]
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"time_scales must be positive periods in days, got {time_scales!r}")
        freqs = torch.tensor([2 * math.pi * 365.0 / s for s in scales])  # radians per year
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(2 * len(scales), dim)
        init_transformer_weights(self)

    def features(self, days: torch.Tensor) -> torch.Tensor:
        """The sin-cos features before the linear layer, ``[..., 2 * len(time_scales)]``."""
        angles = (days.float() / 365.0).unsqueeze(-1) * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(days))


class TemporalEncoder(nn.Module):
    """A few pre-norm transformer blocks over a patient's ``[B, S, C]`` scan tokens.

    Attention keys are restricted to the real scans (``scan_mask``), so padded positions
    cannot reach any real token whatever their values; the output is the final-normed token
    at the latest position ``S - 1`` (always a real scan), ``[B, C]``. The blocks are the
    encoder's own :class:`~jepa_lightning.backbones.vit3d.Block` (SDPA, boolean mask), so
    ``compile: true`` compiles them too.
    """

    def __init__(self, dim: int, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"temporal_depth must be >= 1, got {depth}")
        if dim % num_heads:
            raise ValueError(
                f"temporal_heads={num_heads} does not divide the backbone width {dim}: choose "
                "a divisor of embed_dim"
            )
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        init_transformer_weights(self)

    def forward(self, tokens: torch.Tensor, scan_mask: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or scan_mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"expected tokens [B, S, C] and scan_mask [B, S], got {tuple(tokens.shape)} "
                f"and {tuple(scan_mask.shape)}"
            )
        if not bool(scan_mask[:, -1].all()):
            raise ValueError("scan_mask[:, -1] must be True: the latest scan sits at S - 1")
        attn_mask = scan_mask.bool()[:, None, None, :]  # [B, 1 (heads), 1 (queries), S keys]
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.norm(tokens[:, -1])
