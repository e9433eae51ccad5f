"""The online linear probe every pretraining task trains beside its encoder, DDP-exact."""

from __future__ import annotations

import torch
from torch import nn


class SyncedStandardize(nn.Module):
    """Per-feature standardisation with batch statistics summed over all DDP ranks, and
    running statistics for evaluation (a batch norm without affine parameters).

    Why not ``nn.BatchNorm1d``: each rank would update its running statistics from its own
    batch, so after training the replicas (and the checkpoints each rank would write) differ
    and each rank evaluates its probe with a different normalisation. ``nn.SyncBatchNorm``
    runs on GPUs only. The input is detached (probe features), so the statistics need no
    gradient. In training every rank takes part in the one all-reduce per call (a rank with
    fewer than two samples contributes what it has); a global batch of fewer than two uses
    the running statistics.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @staticmethod
    def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, biased variance and sample count over the global batch, two passes (see
        losses); all tensors, so a GPU step waits on no host round trip."""
        x = x.detach().float()
        total = self._sum_over_ranks(torch.cat([x.sum(0), x.new_full((1,), float(len(x)))]))
        n = total[-1]
        mean = total[:-1] / n.clamp(min=1)
        squares = self._sum_over_ranks(((x - mean) ** 2).sum(0))
        return mean, squares / n.clamp(min=1), n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.running_mean, self.running_var
        if self.training:
            batch_mean, batch_var, n = self._batch_moments(x)
            enough = n >= 2  # a global batch of one keeps (and uses) the running statistics
            with torch.no_grad():
                m = self.momentum
                unbiased = batch_var * n / (n - 1).clamp(min=1)
                new_mean = (1 - m) * self.running_mean + m * batch_mean
                new_var = (1 - m) * self.running_var + m * unbiased
                mean = torch.where(enough, batch_mean, self.running_mean).clone()
                var = torch.where(enough, batch_var, self.running_var).clone()
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
                self.num_batches_tracked += enough.long()
        return (x - mean.to(x.dtype)) / torch.sqrt(var.to(x.dtype) + self.eps)


class OnlineProbe(nn.Module):
    """Linear probe on standardised features: :class:`SyncedStandardize`, then a linear layer.

    Why: the online probe is fitted by SGD beside the encoder, whose feature scale moves
    (a standardised SIGReg leaves it free; at random init the pooled std is ~0.006). On
    raw features the probe's AUROC then tracks the scale, not the content; standardised,
    it tracks what is linearly there (MAE's linear probe does the same).
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.norm = SyncedStandardize(in_features)
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))
