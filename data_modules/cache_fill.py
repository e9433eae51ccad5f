"""Filling the RAM cache at setup: every volume decoded once, over worker processes and ranks.

Why its own module: at real size this is the hour before the first step (1,000 scans of
512 x 512 x 300). Before, the main process decoded one volume after the other, so
``num_workers`` did not help and every DDP rank decoded everything. Now:

* the volumes are decoded by ``num_workers`` DataLoader worker processes (the same
  processes PyTorch uses for batches; each returns its preprocessed crop, a few MB);
* under DDP with a disk cache (``cache_dir``), each rank decodes only its share
  (``rank::world_size``) into the disk cache, all ranks wait for each other, and each then
  reads every entry back (a ``torch.load`` of a few MB). Without a disk cache each rank
  must decode every volume it holds in RAM (logged once, with the fix);
* a progress bar that stays on screen (count, rate, ETA) on rank 0.

Bad files are found the same way on every rank (the final pass reads every item), so the
ranks keep the same rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data_modules.cache import AtomicPersistentDataset
from data_modules.manifest import RowProblems
from data_modules.readers import BadSampleError

log = logging.getLogger(__name__)


class VolumeJobs(Dataset):
    """Items ``indices`` of ``items``, each read through the disk cache or the chain;
    yields ``(index, int16 volume codes or None, error message or None)`` so a bad file
    travels back from a worker as text instead of stopping the pool."""

    def __init__(self, items: list[dict[str, Any]], indices: list[int], pipeline, disk):
        self.items, self.indices, self.pipeline, self.disk = items, indices, pipeline, disk

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple[int, torch.Tensor | None, str | None]:
        from data_modules.dataset import read_codes

        i = self.indices[n]
        try:  # int16 codes: half the bytes through the worker queue and in the RAM cache
            return i, read_codes(self.items, i, self.pipeline, self.disk), None
        except BadSampleError as err:
            return i, None, str(err)


def run_jobs(jobs: VolumeJobs, num_workers: int, desc: str, show: bool):
    """``jobs`` in this process (``num_workers=0``) or over worker processes, in order,
    behind a progress bar that stays on screen."""
    if num_workers > 0 and len(jobs) > 1:
        loader = DataLoader(
            jobs, batch_size=None, shuffle=False, num_workers=min(num_workers, len(jobs))
        )
        results = iter(loader)
    else:
        results = (jobs[n] for n in range(len(jobs)))
    bar = tqdm(results, total=len(jobs), desc=desc, unit="vol", leave=True, disable=not show)
    yield from bar


def distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def preload_volumes(
    rows: pd.DataFrame,
    cache: dict[tuple, torch.Tensor],
    pipeline,
    disk: AtomicPersistentDataset | None,
    on_bad_sample: str,
    problems: RowProblems,
    name: str,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> pd.DataFrame:
    """Decode + preprocess every volume of ``rows`` not yet in ``cache`` once, into it.

    Why at setup: each volume is then decoded once per process however many epochs and
    workers read it. Returns the rows whose volume could be read; the others raise or are
    dropped and counted in ``problems``. ``rank``/``world_size`` default to the process
    group's.
    """
    from data_modules.dataset import bad_sample, cache_key, volume_items

    if rank is None or world_size is None:
        rank, world_size = distributed()
    items = volume_items(rows)
    keep = np.ones(len(rows), dtype=bool)
    todo = [i for i, item in enumerate(items) if cache_key(item) not in cache]
    show = rank == 0 and bool(todo)
    if todo and world_size > 1 and disk is not None:  # each rank its share, into the disk
        share = todo[rank::world_size]
        jobs = VolumeJobs(items, share, pipeline, disk)
        desc = f"caching {name} volumes (rank 0's share of {world_size})"
        for _ in run_jobs(jobs, num_workers, desc, show):
            pass  # errors are met again, by every rank, in the pass below
        barrier()
    elif todo and world_size > 1 and rank == 0:
        log.info(
            "%s split: every one of %d ranks decodes all %d volumes into its RAM cache; set "
            "cache_dir to share the work (each rank decodes 1/%d into the disk cache)",
            name, world_size, len(todo), world_size,
        )  # fmt: skip
    jobs = VolumeJobs(items, todo, pipeline, disk)
    for i, volume, error in run_jobs(jobs, num_workers, f"loading {name} volumes", show):
        if error is None:
            cache[cache_key(items[i])] = volume
            continue
        problems.add(bad_sample(BadSampleError(error), rows["scan_id"].iloc[i], on_bad_sample))
        keep[i] = False
    if not keep.all():
        log.warning("%s split: %s", name, problems.summary())
    return rows[keep].reset_index(drop=True)
