"""From manifest rows to batches: the Dataset, the RAM-cache preload, the collate, skip reports.

A sample is a dict of plain tensors and strings (``image [1, D, H, W]``, ``ehr [F]``,
``ehr_missing [F]``, ``label``, ``patient_id``, ``scan_id``, ``cohort``). A bad file either
raises a :class:`~data_modules.readers.BadSampleError` naming the file and the manifest row,
or, under ``on_bad_sample='skip'``, becomes ``{"skipped": reason}``, which the collate drops
and the loader counts and reports at the end of the epoch. Kept apart from the data module
so that what a sample *is* can be read (and tested) without the setup around it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from data_modules.cache import AtomicPersistentDataset
from data_modules.compact_volume import compact, expand
from data_modules.manifest import ROI_COLUMNS, SERIES_COLUMN
from data_modules.readers import BadSampleError, as_bad_sample
from data_modules.roi import ROI_SPACE_COLUMN
from data_modules.streaming import StreamingLoader
from data_modules.transforms import CTAugment, load_volume, volume_item

log = logging.getLogger(__name__)


def volume_items(table: pd.DataFrame) -> list[dict[str, Any]]:
    """One :func:`volume_item` per row (ROI from ``roi_x/y/z`` when the manifest has them)."""
    has_roi = all(c in table.columns for c in ROI_COLUMNS)
    rois = table[list(ROI_COLUMNS)].to_numpy(dtype=float) if has_roi else [None] * len(table)
    spaces = table[ROI_SPACE_COLUMN] if ROI_SPACE_COLUMN in table.columns else None
    spaces = spaces.tolist() if spaces is not None else [None] * len(table)
    series = table[SERIES_COLUMN].tolist() if SERIES_COLUMN in table else [None] * len(table)
    return [
        volume_item(p, r, s or "ras_mm", u)  # validate_manifest refused ROIs without a space
        for p, r, s, u in zip(table["image_path"], rois, spaces, series, strict=True)
    ]


def cache_key(item: dict[str, Any]) -> tuple:
    """The in-RAM cache key: one entry per (file, ROI), so two nodules of a scan differ."""
    return (item["image"], item["roi"], item.get("roi_space"), item.get("series_uid"))


def read_codes(
    items: list[dict[str, Any]], i: int, pipeline, disk: AtomicPersistentDataset | None
) -> torch.Tensor:
    """Volume ``i`` as the int16 codes of :mod:`~data_modules.compact_volume`: the disk
    cache's entry as stored when there is one, else the chain's output rounded the same way;
    any failure is a :class:`BadSampleError` naming the file."""
    if disk is None:
        return compact(load_volume(items[i], pipeline))
    try:
        return compact(disk[i]["image"])  # int16 already: no conversion
    except BadSampleError:
        raise
    except Exception as err:
        raise as_bad_sample(err, items[i]["source"]) from err


def read_volume(
    items: list[dict[str, Any]], i: int, pipeline, disk: AtomicPersistentDataset | None
) -> torch.Tensor:
    """Volume ``i`` as float32: :func:`read_codes` expanded, so a sample is identical
    whichever cache served it (or none)."""
    return expand(read_codes(items, i, pipeline, disk))


def bad_sample(err: BadSampleError, scan_id: Any, on_bad_sample: str) -> str:
    """The reason to record for a skipped scan; under ``raise`` the error itself, with the
    manifest row and the way out added."""
    reason = f"{err} (manifest row scan_id={scan_id!r})"
    if on_bad_sample == "raise":
        raise BadSampleError(reason + "; or set on_bad_sample: skip") from err
    return reason


class CTEHRDataset(Dataset):
    """Scans of one split, as plain-tensor samples.

    A volume comes from the in-RAM cache when one was filled at setup, else from the on-disk
    cache (``disk``, an :class:`~data_modules.cache.AtomicPersistentDataset` over the same
    rows), else straight from the file through ``pipeline``. ``augment`` (training split only)
    runs afterwards on every read, seeded from torch's RNG so each worker and epoch differs
    and ``seed_everything`` reproduces it.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        ehr: np.ndarray,
        pipeline,
        on_bad_sample: str,
        cache: dict | None,
        disk: AtomicPersistentDataset | None = None,
        augment: CTAugment | None = None,
        image_size: Sequence[int] | None = None,
    ):
        self.table = table.reset_index(drop=True)
        self.ehr = ehr  # [N, F] normalised, NaN = missing
        self.pipeline = pipeline
        self.on_bad_sample = on_bad_sample
        self.cache = cache
        self.disk = disk
        self.items = volume_items(self.table)
        self.augment = augment.build(image_size) if augment is not None else None
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.table)

    def volume(self, i: int, codes: bool = False) -> torch.Tensor:
        """Volume ``i``, augmented when this split augments; ``codes``: as the int16 codes of
        :mod:`~data_modules.compact_volume` (unaugmented), for a caller that expands them
        itself (the device-augmentation path expands on the training device)."""
        key = cache_key(self.items[i])
        cached = self.cache is not None and key in self.cache
        if codes and self.augment is None:
            if cached:
                return self.cache[key]  # no copy: collate stacks it
            return read_codes(self.items, i, self.pipeline, self.disk)
        if cached:
            image = expand(self.cache[key])  # the RAM cache holds int16 codes
        else:
            image = read_volume(self.items, i, self.pipeline, self.disk)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            out = self.augment(image)
            image = torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out)
            image = image.to(torch.float32).contiguous()
        return image

    def item(self, i: int, codes: bool = False) -> dict[str, Any]:
        """Sample ``i`` (``{"skipped": reason}`` for a bad scan under ``skip``)."""
        row = self.table.iloc[i]
        try:
            image = self.volume(i, codes)
        except BadSampleError as err:
            reason = bad_sample(err, row["scan_id"], self.on_bad_sample)
            self.skipped.append(reason)
            return {"skipped": reason}
        ehr = torch.from_numpy(self.ehr[i])
        return {
            "image": image,
            "ehr": ehr,
            "ehr_missing": torch.isnan(ehr),
            "label": torch.tensor(row["label"], dtype=torch.float32),
            "patient_id": row["patient_id"],
            "scan_id": row["scan_id"],
            "cohort": row["cohort"],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i)


class CodesView(Dataset):
    """A split's samples with their images as int16 codes: what the training loader reads
    when augmentation runs on the device (half the bytes through the worker queue and the
    host-to-device copy; the data module expands them after the transfer). The dataset
    itself keeps returning float32 for everything else that reads it."""

    def __init__(self, dataset: CTEHRDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset.item(i, codes=True)


class BatchCollator:
    """Drops skipped samples, collates, lets the task add its extras, and lists the skip
    reasons under ``"skipped"`` (the loader removes and counts them before the task sees the
    batch; an all-skipped batch becomes ``{}``, which tasks pass over)."""

    def __init__(self, hook: Callable[[dict], dict] | None = None):
        self.hook = hook

    def __call__(self, samples: list[dict | None]) -> dict:
        skipped = [s["skipped"] for s in samples if s is not None and "skipped" in s]
        samples = [s for s in samples if s is not None and "skipped" not in s]
        batch = default_collate(samples) if samples else {}
        if batch and self.hook is not None:
            batch = self.hook(batch)
        if skipped:
            batch["skipped"] = skipped
        return batch


class SkipReport:
    """Counts skipped samples over one pass of a loader and logs the count and first reasons."""

    def __init__(self, name: str, limit: int = 5):
        self.name, self.limit = name, limit
        self.reasons: list[str] = []
        self.last_epoch: list[str] = []

    def take(self, batch: dict) -> dict:
        if isinstance(batch, dict) and "skipped" in batch:
            self.reasons.extend(batch.pop("skipped"))
        return batch

    def close(self) -> None:
        self.last_epoch, self.reasons = self.reasons, []
        if self.last_epoch:
            head = "; ".join(self.last_epoch[: self.limit])
            more = len(self.last_epoch) - self.limit
            log.warning(
                "%s: %d bad sample(s) skipped this epoch: %s%s",
                self.name,
                len(self.last_epoch),
                head,
                f" (+{more} more)" if more > 0 else "",
            )


class SkipReporting:
    """Mixin for a ``DataLoader`` class: iteration strips the skip reasons from the batches
    and reports them at the end of each pass (epoch), in the main process, whichever worker
    met them. A mixin, not a wrapper, so that Lightning still sees a ``DataLoader`` of the
    class it was given and can re-create it (to insert its sampler)."""

    def __init__(self, *args: Any, report_name: str = "data", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.report = SkipReport(report_name)

    def __iter__(self) -> Iterator[dict]:
        return _reported(super().__iter__(), self.report)


def _reported(batches: Iterator[dict], report: SkipReport) -> Iterator[dict]:
    try:
        for batch in batches:
            yield report.take(batch)
    finally:
        report.close()


# Each class holds ``__init__`` itself: Lightning records the arguments of a loader class's
# own ``__init__`` (``report_name`` included) to re-create the loader with its sampler.
class ReportingLoader(SkipReporting, DataLoader):
    """A map-style ``DataLoader`` with the skip report of :class:`SkipReporting`."""

    __init__ = SkipReporting.__init__


class ReportingStreamLoader(SkipReporting, StreamingLoader):
    """A :class:`~data_modules.streaming.StreamingLoader` with the same skip report."""

    __init__ = SkipReporting.__init__
