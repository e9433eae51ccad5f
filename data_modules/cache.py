"""On-disk cache of preprocessed volumes: MONAI's ``PersistentDataset`` with two fixes.

``PersistentDataset`` already does what we want in outline: it runs the deterministic
transforms once per item, saves the result as ``<hash>.pt`` in ``cache_dir`` and reads it on
later epochs. Two properties we need it does not give:

* **a changed configuration never reads a stale entry**: its ``hash_transform`` hashes the
  transforms' *class names* when they are not JSON-serialisable (MONAI transforms never are),
  so a new spacing or window would hit the old files. We give it the digest of our
  preprocessing config (:func:`data_modules.transforms.pipeline_key`). The item hash covers
  the file path *and* its size/mtime stamp, so a replaced file is decoded again.
* **atomic writes across processes**: it writes to a temporary folder under the system
  temp dir and ``shutil.move``s the file over; when that folder is on another filesystem
  (``/tmp`` on tmpfs, the cache on a shared disk: the common cluster case) the move is a copy,
  and a concurrent DDP rank or worker can read a half-written file. We write into
  ``cache_dir`` itself and ``os.replace`` (atomic on POSIX), so a reader sees either no file or
  a complete one; two writers of the same entry both write complete files, the last wins.

Entries are never deleted by us (the key changes instead); delete the folder to reclaim space.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.transforms import Compose

from data_modules.compact_volume import compact

log = logging.getLogger(__name__)


class AtomicPersistentDataset(PersistentDataset):
    """``PersistentDataset`` keyed by (item incl. file stamp, config key), written atomically.

    Args:
        data: items from :func:`data_modules.transforms.volume_item`.
        transform: the deterministic chain (``ct_pipeline``).
        cache_dir: folder of the ``.pt`` entries; created when absent.
        config_key: digest of the preprocessing configuration.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Compose,
        cache_dir: str | Path,
        config_key: str,
    ):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            data=data,
            transform=transform,
            cache_dir=cache_dir,
            hash_transform=lambda _transforms: config_key.encode(),
            weights_only=True,
        )
        self.config_key = config_key

    def entry_path(self, item: dict[str, Any]) -> Path:
        """Where ``item``'s entry lives (whether or not it was written yet)."""
        return Path(self.cache_dir) / f"{self.hash_func(item).decode()}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: dict[str, Any]) -> Any:
        hashfile = self.entry_path(item_transformed)
        if hashfile.is_file():
            try:  # memory-mapped: only the pages a reader touches are read
                return torch.load(hashfile, weights_only=True, mmap=True)
            except Exception:  # unreadable entry (disk trouble, foreign file): recompute it
                pass
        result = self._pre_transform(dict(item_transformed))
        entry = {"image": compact(result["image"])}  # int16 codes (data_modules.compact_volume)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(
                dir=hashfile.parent, prefix=f".{hashfile.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "wb") as fh:
                torch.save(entry, fh)
            os.replace(tmp, hashfile)  # atomic: readers see no file or a complete one
        except OSError as err:  # read-only or full cache disk: training goes on uncached
            log.warning("could not write cache entry %s (%s); continuing uncached", hashfile, err)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)  # only left when the write failed or was interrupted
        return entry


# --- in-RAM volume caches shared by the data modules of one process ------------------------
_shared_volume_caches: dict[str, dict] | None = None


@contextmanager
def shared_volume_cache() -> Iterator[None]:
    """Inside this block, data modules of this process that preprocess volumes the same way
    share one in-RAM volume cache (``cache_volumes``), keyed by
    :func:`data_modules.transforms.pipeline_key`.

    Why: a study builds a fresh data module for every run, which would decode and resample
    every NIfTI again (most of a short run's time). Volumes from the same file and the same
    preprocessing are identical, so within a study they are decoded once. Nested blocks share
    the outer block's caches; on leaving the outermost block the caches are dropped.
    """
    global _shared_volume_caches
    outer = _shared_volume_caches
    if outer is None:
        _shared_volume_caches = {}
    try:
        yield
    finally:
        _shared_volume_caches = outer


def volume_cache_for(key: str) -> dict:
    """The in-RAM volume cache for preprocessing ``key``: the shared one inside
    :func:`shared_volume_cache`, a fresh dict otherwise."""
    if _shared_volume_caches is None:
        return {}
    return _shared_volume_caches.setdefault(key, {})
