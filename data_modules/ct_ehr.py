"""CTEHRDataModule: any manifest of CT volumes + EHR vectors -> batches of plain tensors.

A batch is a dict: ``image [B, 1, D, H, W]`` in [0, 1], ``ehr [B, F]`` (z-scored with
training-split statistics; NaN = missing), ``ehr_missing [B, F]`` bool, ``label [B]``
(NaN = unlabelled), ``patient_id``/``scan_id``/``cohort`` lists of str, plus whatever
the task's ``collate_hook`` adds (JEPA mask indices).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from data_modules.cache import AtomicPersistentDataset, volume_cache_for
from data_modules.ehr_table import EHRJoin, ehr_table_features, join_ehr, read_ehr_table
from data_modules.label_subsets import LabelFractionError, apply_label_fraction
from data_modules.manifest import (
    ROI_COLUMNS,
    RowProblems,
    assign_patient_splits,
    ehr_columns,
    read_table,
    resolve_image_paths,
    table_columns,
    validate_manifest,
)
from data_modules.streaming import ShardedStream, StreamingLoader
from data_modules.transforms import (
    BadSampleError,
    CTAugment,
    CTPreprocess,
    as_bad_sample,
    ct_pipeline,
    load_volume,
    pipeline_key,
    volume_item,
)

log = logging.getLogger(__name__)


class CTEHRDataset(Dataset):
    """Scans of one split, as plain-tensor samples.

    A volume comes from the in-RAM cache when one was filled at setup, else from the on-disk
    cache (``disk``, an :class:`~data_modules.cache.AtomicPersistentDataset` over the same
    rows), else straight from the file through ``pipeline``. ``augment`` (training split only)
    runs afterwards on every read, seeded from torch's RNG so each worker and epoch differs
    and ``seed_everything`` reproduces it.

    A bad file raises a :class:`BadSampleError` naming the file and the manifest row, or,
    under ``on_bad_sample='skip'``, yields ``{"skipped": reason}``, which the collate drops
    and the loader counts and reports at the end of the epoch.
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

    def volume(self, i: int) -> torch.Tensor:
        item = self.items[i]
        key = cache_key(item)
        if self.cache is not None and key in self.cache:
            image = self.cache[key]
        elif self.disk is not None:
            try:
                image = self.disk[i]["image"]
            except Exception as err:
                raise as_bad_sample(err, item["source"]) from err
        else:
            image = load_volume(item, self.pipeline)
        if self.augment is not None:
            self.augment.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            out = self.augment(image)
            image = torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out)
            image = image.to(torch.float32).contiguous()
        return image

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.table.iloc[i]
        try:
            image = self.volume(i)
        except BadSampleError as err:
            reason = f"{err} (manifest row scan_id={row['scan_id']!r})"
            if self.on_bad_sample == "raise":
                raise BadSampleError(reason + "; or set on_bad_sample: skip") from err
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


def volume_items(table: pd.DataFrame) -> list[dict[str, Any]]:
    """One :func:`volume_item` per row (ROI from ``roi_x/y/z`` when the manifest has them)."""
    has_roi = all(c in table.columns for c in ROI_COLUMNS)
    rois = table[list(ROI_COLUMNS)].to_numpy(dtype=float) if has_roi else [None] * len(table)
    return [volume_item(p, r) for p, r in zip(table["image_path"], rois, strict=True)]


def cache_key(item: dict[str, Any]) -> tuple:
    """The in-RAM cache key: one entry per (file, ROI), so two nodules of a scan differ."""
    return (item["image"], item["roi"])


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


class ReportingLoader(DataLoader):
    """A ``DataLoader`` whose iteration strips skip reasons from batches and reports them at
    the end of each pass (epoch), in the main process, whichever worker met them."""

    def __init__(self, *args, report_name: str = "data", **kwargs):
        super().__init__(*args, **kwargs)
        self.report = SkipReport(report_name)

    def __iter__(self):
        return _reporting(super().__iter__(), self.report)


class ReportingStreamLoader(StreamingLoader):
    """:class:`StreamingLoader` with the same skip report as :class:`ReportingLoader`."""

    def __init__(self, *args, report_name: str = "data", **kwargs):
        super().__init__(*args, **kwargs)
        self.report = SkipReport(report_name)

    def __iter__(self):
        return _reporting(super().__iter__(), self.report)


def _reporting(batches, report: SkipReport):
    try:
        for batch in batches:
            yield report.take(batch)
    finally:
        report.close()


class CTEHRDataModule(L.LightningDataModule):
    """Reads a manifest (CSV or Parquet) following the data contract.

    Args:
        manifest: path of the manifest table.
        image_size: volumes are resized to this (D, H, W) after the HU window.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes (masks are built there too).
        on_bad_sample: ``raise`` (default) stops at the first bad row/file with a message
            naming it; ``skip`` drops it, counts it and logs the first reasons.
        ehr_columns: EHR feature columns; default every ``ehr_*`` column.
        hu_window: Hounsfield window mapped to [0, 1].
        require_labels: train only on labelled scans (finetuning); unlabelled ones are
            counted and left out. Pretraining keeps them (the unlabelled archive).
        val_fraction / test_fraction / split_seed: patient-level split when the manifest
            has no ``split`` column.
        predict_split: which split ``predict`` runs on (``all`` for every scan).
        cache_volumes: preprocess every volume once at setup and keep it in RAM
            (``N * prod(image_size) * 4`` bytes); workers share it by fork.
        drop_last: drop the last incomplete training batch (streaming: see
            :mod:`data_modules.streaming` for what it means across ranks and workers).
        preprocess: the CT chain (orientation, target spacing, ROI crop, padding):
            :class:`~data_modules.transforms.CTPreprocess`; default: RAS orientation, each
            scan's own spacing, the whole volume.
        augment: training-split augmentation (:class:`~data_modules.transforms.CTAugment`);
            default none.
        cache_dir: folder of an on-disk cache of preprocessed volumes, keyed by file
            size/mtime and the preprocessing config, written atomically (safe under DDP);
            later epochs and later runs skip decoding. Default: no disk cache.
        streaming: iterate each split as a :class:`~data_modules.streaming.ShardedStream`
            (shards over DDP ranks x workers, new shuffle per epoch, nothing held in RAM;
            ``cache_volumes`` is then not used). For archives larger than RAM.
        stream_seed: base seed of the streaming shuffle (the same on every rank).
        ehr_table: a second table (CSV/Parquet) with EHR features, joined per ``ehr_join``;
            its non-key columns are features (pick with ``ehr_columns``).
        ehr_join: ``scan_id`` (exact) or ``nearest_before`` (the patient's latest record at or
            before the scan's ``scan_time``); see :mod:`data_modules.ehr_table`.
        drop_last: drop the last incomplete training batch.
        label_fraction / label_subset_seed: keep the labels of only this fraction of the
            labelled training *patients* (seeded, stratified, nested across fractions; see
            :mod:`data_modules.label_subsets`); the others' training scans count as unlabelled.
    """

    def __init__(
        self,
        manifest: str,
        image_size: int | list[int] = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        ehr_columns: list[str] | None = None,
        hu_window: tuple[float, float] = (-1000.0, 400.0),
        require_labels: bool = False,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        cache_volumes: bool = True,
        drop_last: bool = True,
        preprocess: CTPreprocess | None = None,
        augment: CTAugment | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        stream_seed: int = 0,
        ehr_table: str | None = None,
        ehr_join: EHRJoin = "scan_id",
        label_fraction: float = 1.0,
        label_subset_seed: int = 0,
    ):
        super().__init__()
        if not 0.0 < label_fraction <= 1.0:
            raise LabelFractionError(f"label_fraction must be in (0, 1], got {label_fraction}")
        self.label_fraction = label_fraction
        self.label_subset_seed = label_subset_seed
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.manifest = manifest
        self.image_size = [image_size] * 3 if isinstance(image_size, int) else list(image_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        self.selected_ehr_columns = ehr_columns
        self.hu_window = tuple(hu_window)
        self.require_labels = require_labels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.predict_split = predict_split
        self.cache_volumes = cache_volumes
        self.drop_last = drop_last
        self.preprocess = preprocess or CTPreprocess()
        self.augment = augment
        self.cache_dir = cache_dir
        self.streaming = streaming
        self.stream_seed = stream_seed
        self.ehr_table = ehr_table
        self.ehr_join = ehr_join
        self.collate_hook: Callable[[dict], dict] | None = None
        self.ehr_stats: dict[str, Any] | None = None
        self.problems = RowProblems()
        self._table: pd.DataFrame | None = None
        self._datasets: dict[str, CTEHRDataset] = {}
        self._cache: dict[tuple, torch.Tensor] | None = None

    # --- sizes a model needs before setup (LightningCLI links them into the model) -------
    @property
    def ehr_feature_names(self) -> list[str]:
        columns = table_columns(self.manifest)
        if self.ehr_table is None:
            return ehr_columns(columns, self.selected_ehr_columns)
        from_table = ehr_table_features(self.ehr_table, self.ehr_join, None)
        if self.selected_ehr_columns is None:
            return ehr_columns(columns) + from_table
        return ehr_columns(columns + from_table, self.selected_ehr_columns)

    def _table_features(self) -> list[str]:
        """The chosen features that come from ``ehr_table`` (not from the manifest)."""
        from_table = set(ehr_table_features(self.ehr_table, self.ehr_join, None))
        return [c for c in self.ehr_feature_names if c in from_table]

    @property
    def n_ehr_features(self) -> int:
        n = len(self.ehr_feature_names)
        if n == 0:
            raise ValueError(
                f"manifest {self.manifest} has no EHR column: add ehr_* columns or set ehr_columns"
            )
        return n

    # --- setup ----------------------------------------------------------------------------
    def load_table(self) -> pd.DataFrame:
        """The validated manifest with a ``split`` and absolute ``image_path`` per row."""
        names = self.ehr_feature_names
        df = read_table(self.manifest)
        if self.ehr_table is not None:
            wanted = self._table_features()
            ehr = read_ehr_table(self.ehr_table, self.ehr_join, wanted)
            df, match = join_ehr(
                df, ehr, self.ehr_join, wanted, str(self.ehr_table), str(self.manifest)
            )
            log.info(
                "EHR table %s: %d of %d scans have a record",
                self.ehr_table,
                match.matched,
                match.total,
            )
        df = validate_manifest(df, str(self.manifest), names, self.on_bad_sample, self.problems)
        if "split" not in df.columns:
            df["split"] = assign_patient_splits(
                df, self.val_fraction, self.test_fraction, self.split_seed
            )
            if df["cohort"].nunique() > 1:
                log.warning(
                    "manifest %s has no split column: patients of every cohort (%s) were split "
                    "at random, so 'external' scans are also trained on; add a split column "
                    "(e.g. external -> test) for a true external test",
                    self.manifest,
                    sorted(df["cohort"].unique()),
                )
        df["image_path"] = resolve_image_paths(df, self.manifest)
        return df

    def setup(self, stage: str | None = None) -> None:
        if self._table is None:
            self._table = self.load_table()
            if self.problems.reasons:
                log.warning("manifest %s: %s", self.manifest, self.problems.summary())
        table = self._table
        if self.streaming and self.cache_volumes and self._cache is None:
            log.info("streaming: volumes are read per step (cache_volumes is not used)")
        if self.ehr_stats is None:
            self.ehr_stats = self.fit_ehr_stats(table)
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["predict"],
            None: ["train", "val", "test"],
        }[stage]
        for name in wanted:
            if name in self._datasets:
                continue
            rows = self.rows_for(name)
            if self.cache_volumes and not self.streaming:
                rows = self.fill_cache(rows, name)
            self._datasets[name] = CTEHRDataset(
                rows, self.normalise_ehr(rows), self.pipeline(), self.on_bad_sample,
                self._cache, self.disk_cache(rows), self.augment if name == "train" else None,
                self.image_size,
            )  # fmt: skip

    def rows_for(self, name: str) -> pd.DataFrame:
        table = self._table
        if name == "predict":
            rows = (
                table
                if self.predict_split == "all"
                else table[table["split"] == self.predict_split]
            )
        else:
            rows = table[table["split"] == name]
        if name == "train" and self.label_fraction < 1.0:
            rows = apply_label_fraction(
                rows, self.label_fraction, self.label_subset_seed, str(self.manifest)
            )
            log.info(
                "label_fraction=%s (subset %d): labels of %d training patients kept",
                self.label_fraction,
                self.label_subset_seed,
                rows.loc[rows["label"].notna(), "patient_id"].nunique(),
            )
        if name == "train" and self.require_labels:
            labelled = rows["label"].notna()
            log.info("training on %d labelled of %d training scans", int(labelled.sum()), len(rows))
            rows = rows[labelled]
        if rows.empty:
            raise ValueError(
                f"manifest {self.manifest}: the {name!r} split has no usable scan "
                f"(splits present: {table['split'].value_counts().to_dict()})"
            )
        return rows.reset_index(drop=True)

    def pipeline(self):
        """The deterministic preprocessing chain (MONAI transforms)."""
        return ct_pipeline(self.image_size, self.hu_window, self.preprocess)

    def disk_cache(self, rows: pd.DataFrame) -> AtomicPersistentDataset | None:
        if self.cache_dir is None:
            return None
        key = pipeline_key(self.image_size, self.hu_window, self.preprocess)
        return AtomicPersistentDataset(volume_items(rows), self.pipeline(), self.cache_dir, key)

    def fill_cache(self, rows: pd.DataFrame, name: str) -> pd.DataFrame:
        """Decode + preprocess every volume of ``rows`` once (through the disk cache when
        there is one). Bad files raise or are dropped and counted."""
        if self._cache is None:
            self._cache = volume_cache_for(
                pipeline_key(self.image_size, self.hu_window, self.preprocess)
            )
        pipeline, disk = self.pipeline(), self.disk_cache(rows)
        items = volume_items(rows)
        keep = np.ones(len(rows), dtype=bool)
        todo = [i for i, item in enumerate(items) if cache_key(item) not in self._cache]
        for i in tqdm(todo, desc=f"loading {name} volumes", disable=not todo, leave=False):
            try:
                try:
                    image = (
                        disk[i]["image"] if disk is not None else load_volume(items[i], pipeline)
                    )
                except BadSampleError:
                    raise
                except Exception as err:
                    raise as_bad_sample(err, items[i]["source"]) from err
                self._cache[cache_key(items[i])] = image
            except BadSampleError as err:
                reason = f"{err} (manifest row scan_id={rows['scan_id'].iloc[i]!r})"
                if self.on_bad_sample == "raise":
                    raise BadSampleError(reason + "; or set on_bad_sample: skip") from err
                self.problems.add(reason)
                keep[i] = False
        if not keep.all():
            log.warning("%s split: %s", name, self.problems.summary())
        return rows[keep].reset_index(drop=True)

    # --- EHR normalisation (fitted on train only; saved in checkpoints) --------------------
    def fit_ehr_stats(self, table: pd.DataFrame) -> dict[str, Any]:
        names = self.ehr_feature_names
        train = table.loc[table["split"] == "train", names].to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        if len(train) == 0:
            raise ValueError(f"manifest {self.manifest}: no training rows to fit EHR statistics on")
        with np.errstate(all="ignore"):
            mean = np.nanmean(train, axis=0)
            std = np.nanstd(train, axis=0)
        all_missing = [n for n, m in zip(names, mean, strict=True) if np.isnan(m)]
        if all_missing:
            log.warning(
                "EHR columns missing in every training row (kept as always-missing): %s",
                all_missing,
            )
        mean = np.nan_to_num(mean, nan=0.0)
        std = np.where(np.isnan(std) | (std < 1e-8), 1.0, std)
        return {"columns": names, "mean": mean.tolist(), "std": std.tolist()}

    def normalise_ehr(self, rows: pd.DataFrame) -> np.ndarray:
        names = self.ehr_stats["columns"]
        values = rows[names].to_numpy(dtype=np.float32, na_value=np.nan)
        mean = np.asarray(self.ehr_stats["mean"], dtype=np.float32)
        std = np.asarray(self.ehr_stats["std"], dtype=np.float32)
        return ((values - mean) / std).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "ehr_stats": self.ehr_stats,
            # what load_encoder / the embed command need to read a new archive the same way
            "preprocessing": {
                "image_size": list(self.image_size),
                "hu_window": list(self.hu_window),
                "preprocess": asdict(self.preprocess),
            },
        }
        if hasattr(self.collate_hook, "state_dict"):  # e.g. the JEPA mask stream
            state["collate_hook"] = self.collate_hook.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reuse the statistics a checkpoint was trained with (resume, test, predict)."""
        hook_state = state_dict.get("collate_hook")
        if hook_state is not None and hasattr(self.collate_hook, "load_state_dict"):
            self.collate_hook.load_state_dict(hook_state)
        stats = state_dict.get("ehr_stats")
        if stats is None:
            return
        if self._table is not None and stats["columns"] != self.ehr_feature_names:
            raise ValueError(
                f"checkpoint was trained on EHR columns {stats['columns']}, this manifest has "
                f"{self.ehr_feature_names}: use the same ehr_columns"
            )
        self.ehr_stats = stats
        for ds in self._datasets.values():
            ds.ehr = self.normalise_ehr(ds.table)

    # --- what the tasks and the evaluation read ---------------------------------------------
    @property
    def split_table(self) -> pd.DataFrame:
        if self._table is None:
            raise RuntimeError("call setup() before reading split_table")
        return self._table[["scan_id", "patient_id", "split", "cohort"]].copy()

    def labelled_counts(self) -> dict[str, int]:
        """Labelled scans per split (``{"train": 84, "val": 0, ...}``): what a checkpoint
        callback reports when a label-based metric was never logged."""
        if self._table is None:
            return {}
        labelled = self._table["label"].notna()
        return {s: int(labelled[self._table["split"] == s].sum()) for s in ("train", "val", "test")}

    @property
    def cohorts(self) -> list[str]:
        if self._table is None:
            raise RuntimeError("call setup() before reading cohorts")
        return sorted(self._table["cohort"].unique())

    def dataset(self, name: str) -> CTEHRDataset:
        return self._datasets[name]

    # --- loaders --------------------------------------------------------------------------
    def _loader(self, name: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if name not in self._datasets:
            self.setup({"train": "fit", "val": "fit", "test": "test", "predict": "predict"}[name])
        ds = self._datasets[name]
        if self.streaming:
            return self._stream_loader(name, ds, shuffle, drop_last)
        sampler = None if name == "train" else self.eval_sampler(ds, name)
        return ReportingLoader(
            ds,
            report_name=f"{name} split",
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last and len(ds) > self.batch_size,
            collate_fn=BatchCollator(self.collate_hook),
        )

    def _stream_loader(
        self, name: str, ds: CTEHRDataset, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (None, None)
        stream = ShardedStream(
            ds, shuffle=shuffle, seed=self.stream_seed, drop_last=drop_last,
            batch_size=self.batch_size, num_workers=self.num_workers, rank=rank, world_size=world,
        )  # fmt: skip
        return ReportingStreamLoader(
            stream,
            report_name=f"{name} split",
            epoch_fn=(lambda: trainer.current_epoch) if trainer else None,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=BatchCollator(self.collate_hook),
        )

    def eval_sampler(self, ds: CTEHRDataset, name: str) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each val/test/predict scan goes to exactly one rank.

        Lightning's default DistributedSampler pads the split with repeated scans so every
        rank gets as many; those repeats would count twice in AUROC/AUPRC and ``n_scans``.
        This sampler gives ranks shares that differ by at most one scan (Lightning keeps a
        DistributedSampler it is handed). Training keeps Lightning's sampler.
        """
        trainer = self.trainer  # set by Lightning when the data module is attached
        if trainer is None or trainer.world_size <= 1:
            return None
        if len(ds) < trainer.world_size:
            raise ValueError(
                f"manifest {self.manifest}: the {name!r} split has {len(ds)} scans for "
                f"{trainer.world_size} ranks; every rank needs at least one: use fewer "
                "devices for evaluation or a larger split"
            )
        return UnrepeatedDistributedSampler(
            ds, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
