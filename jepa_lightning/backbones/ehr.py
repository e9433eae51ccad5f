"""EHR vector -> one token per feature, with missingness as information, not as zero."""

from __future__ import annotations

import torch
from torch import nn


class EHRTokenizer(nn.Module):
    """Turns a normalised EHR vector ``[B, F]`` into tokens ``[B, F, C]``.

    token_f = identity_f + (missing_f ? missing_f-embedding : value_f * w_f + b_f)

    * the identity embedding tells the transformer *which* feature a token is (the EHR
      analogue of a position embedding; the JEPA predictor uses its own copy to ask for a
      feature);
    * a missing value gets a learned per-feature embedding instead of the value path, so a
      missing lab is never confused with a normal one (imputing 0 would do exactly that).

    NaN values are accepted and treated as missing even if ``missing`` does not say so.
    """

    def __init__(self, n_features: int, embed_dim: int):
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_features = n_features
        self.identity = nn.Parameter(torch.randn(n_features, embed_dim) * 0.02)
        self.value_weight = nn.Parameter(torch.randn(n_features, embed_dim) * 0.02)
        self.value_bias = nn.Parameter(torch.zeros(n_features, embed_dim))
        self.missing_embed = nn.Parameter(torch.randn(n_features, embed_dim) * 0.02)

    def forward(self, values: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        if values.shape[-1] != self.n_features:
            raise ValueError(
                f"EHR vector has {values.shape[-1]} features, the tokenizer was built for "
                f"{self.n_features}: the model's n_ehr_features must match the data's EHR columns"
            )
        is_missing = torch.isnan(values)
        if missing is not None:
            is_missing = is_missing | missing.bool()
        clean = torch.where(is_missing, torch.zeros_like(values), values)
        observed = clean.unsqueeze(-1) * self.value_weight + self.value_bias
        tokens = torch.where(
            is_missing.unsqueeze(-1), self.missing_embed.expand_as(observed), observed
        )
        return tokens + self.identity
