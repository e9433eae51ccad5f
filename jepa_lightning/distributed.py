"""Collectives with gradients, so an objective on N ranks x B equals one on 1 process x N·B.

DDP averages the gradients of each rank's loss. That is the gradient of the global objective
only when each rank's loss is a mean over an equal share of it. Three kinds of objective are
not: a mean over a count that differs between ranks (labelled scans, observed EHR values,
target tokens), a statistic of the whole batch (MSN's mean prediction, SIGReg, a variance),
and a loss that pairs samples with each other (CLIP's negatives). Each is written here from
sums over ranks: :func:`all_reduce_sum` returns the same global sum on every rank, and its
backward sums the gradient over ranks, so every rank back-propagates the gradient of the
global value and DDP's average of N equal copies is exactly it.

``torch.distributed.nn.functional`` offered these but is deprecated in torch 2.13; the two
autograd functions below use only the public ``torch.distributed`` collectives. Each
function is the identity (no communication) on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # d(sum_r x_r)/dx_local = 1 on every rank's output, so the local input's gradient is
        # the sum of the gradients that reached each rank's copy of the output.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, differentiable (see the module docstring)."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = torch.zeros(world, dtype=torch.long, device=x.device)
        sizes[dist.get_rank()] = x.shape[0]
        dist.all_reduce(sizes)  # ranks may hold different batch sizes (skipped scans)
        sizes = sizes.tolist()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss saw this rank's rows
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x [B_r, ...]`` concatenated in rank order, ``[sum B_r, ...]``,
    differentiable: the local rows keep their graph and receive the gradient of every rank's
    loss (CLIP's gathered negatives; OpenCLIP's ``gather_with_grad``). Batch sizes may differ
    between ranks, and a rank may hold none."""
    if world_size() == 1:
        return x
    return _AllGatherCat.apply(x)
