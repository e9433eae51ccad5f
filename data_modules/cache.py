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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.transforms import Compose

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
            try:
                return torch.load(hashfile, weights_only=True)
            except Exception:  # unreadable entry (disk trouble, foreign file): recompute it
                pass
        result = self._pre_transform(dict(item_transformed))
        entry = {"image": result["image"]}
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
