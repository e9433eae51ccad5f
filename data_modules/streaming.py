"""Streaming: an iterable dataset sharded over DDP ranks x dataloader workers.

For archives larger than local RAM: nothing is held in memory; each process reads only its
own scans, one at a time, from a map-style *source* (the disk-cached or decoding dataset).

Per epoch, every process draws the same permutation of all scan indices (seeded by ``seed``
and the epoch) and takes a disjoint, interleaved share of it: process ``p`` of
``world_size x num_workers`` takes positions ``p, p + P, p + 2P, ...``. So:

* ``drop_last=False``: **each scan exactly once per epoch** across all ranks and workers.
  Shares differ by at most one scan, so one rank can get one batch more than another —
  fine for validation/test/predict, but DDP *training* would wait forever for the missing
  gradient all-reduce. Use it single-device, or for evaluation.
* ``drop_last=True`` (the training default): the permutation is cut to a multiple of
  ``world_size x num_workers x batch_size`` so every worker yields only full batches and
  every rank the same number of steps; each kept scan appears exactly once, and at most
  ``world_size x num_workers x batch_size - 1`` scans sit out the epoch — different ones each
  epoch, because the permutation changes.

``len()`` is the rank's scan count. With ``drop_last=False`` and several workers each worker
ends on its own partial batch, so an epoch can hold a few more (smaller) batches than
``ceil(len / batch_size)``. Lightning stops an epoch after ``len(loader)`` batches, so
:class:`StreamingLoader` reports the exact count (:meth:`ShardedStream.num_batches`): with
PyTorch's ``ceil(len / batch_size)`` a validation epoch over 2 workers lost half its scans.

The epoch lives in a shared-memory tensor: :class:`StreamingLoader` bumps it each time an
epoch's iteration starts (or the trainer's epoch is used when given), and persistent worker
processes read the new value, so each epoch has a fresh shuffle without re-spawning workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedStream(IterableDataset):
    """Yields ``source[i]`` for this process's share of a per-epoch permutation.

    Args:
        source: any map-style dataset (``len`` + ``__getitem__``); items that are ``None``
            (skipped bad samples) are passed on for the collate to drop.
        shuffle: a new permutation each epoch (else the natural order).
        seed: base of the permutation; every process must use the same.
        drop_last: see the module docstring.
        batch_size: the loader's batch size (for ``drop_last`` and the batch count).
        num_workers: the loader's worker count (for ``drop_last``, ``len`` and the batch count).
        rank, world_size: this process's place among DDP ranks; default from
            ``torch.distributed`` when the iteration starts.
    """

    def __init__(
        self,
        source: Sequence[Any],
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.source = source
        self.shuffle, self.seed, self.drop_last, self.batch_size = (
            shuffle,
            seed,
            drop_last,
            batch_size,
        )
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def _place(self) -> tuple[int, int, int]:
        """(process index, number of processes, workers per rank)."""
        rank, world = self._rank_world()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw, nw

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world_size): as given, else from ``torch.distributed``."""
        rank, world = distributed_rank()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        return rank, world

    def _kept(self, n_proc: int) -> int:
        """How many positions of the permutation are used (``drop_last`` cuts it to whole
        batches for every process)."""
        n = len(self.source)
        if not self.drop_last:
            return n
        unit = n_proc * self.batch_size
        return n // unit * unit

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This process's scan indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.source)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        proc, n_proc, _ = self._place()
        return order[: self._kept(n_proc)][proc::n_proc]

    def worker_shares(self) -> list[int]:
        """Scans each of this rank's workers yields per epoch (one entry with
        ``num_workers=0``): process ``rank * workers + w`` takes positions ``p, p + P, ...``
        of the (possibly cut) permutation."""
        rank, world = self._rank_world()
        nw = max(1, self.num_workers)
        n_proc = world * nw
        n = self._kept(n_proc)
        return [len(range(proc, n, n_proc)) for proc in range(rank * nw, (rank + 1) * nw)]

    def __len__(self) -> int:
        """Scans this *rank* yields per epoch (over all its workers)."""
        return sum(self.worker_shares())

    def num_batches(self) -> int:
        """Batches this rank's loader yields per epoch: each worker batches its own share,
        its last batch possibly partial (dropped with ``drop_last``, where none is)."""
        bs = self.batch_size
        return sum(
            share // bs if self.drop_last else -(-share // bs) for share in self.worker_shares()
        )

    def __iter__(self) -> Iterator[Any]:
        for i in self.indices():
            yield self.source[int(i)]


class StreamingLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ShardedStream` that starts each epoch's shuffle.

    Each ``iter(loader)`` sets the stream's epoch — from ``epoch_fn`` (e.g. the trainer's
    ``current_epoch``, so a resumed run continues the sequence) or from its own counter —
    before workers start reading.
    """

    def __init__(
        self, dataset: ShardedStream, *args, epoch_fn: Callable[[], int] | None = None, **kw
    ):
        super().__init__(dataset, *args, **kw)
        for name in ("batch_size", "num_workers"):
            if getattr(dataset, name) != getattr(self, name):
                raise ValueError(
                    f"StreamingLoader: {name}={getattr(self, name)} but the ShardedStream was "
                    f"built with {name}={getattr(dataset, name)}; pass the same value to both "
                    "(the stream needs it to shard and to count batches)"
                )
        self.epoch_fn = epoch_fn
        self._count = 0

    def __len__(self) -> int:
        """Exact batches per epoch (what Lightning iterates up to), not PyTorch's
        ``ceil(len(dataset) / batch_size)``, which misses the workers' partial batches."""
        return self.dataset.num_batches()

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._count
        self.dataset.set_epoch(epoch)
        self._count += 1
        return super().__iter__()
