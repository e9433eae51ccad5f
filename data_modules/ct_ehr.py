"""CTEHRDataModule: any manifest of CT volumes + EHR vectors -> batches of plain tensors.

A batch is a dict: ``image [B, 1, D, H, W]`` in [0, 1], ``ehr [B, F]`` (z-scored with
training-split statistics; NaN = missing), ``ehr_missing [B, F]`` bool, ``label [B]``
(NaN = unlabelled), ``patient_id``/``scan_id``/``cohort`` lists of str, plus whatever
the task's ``collate_hook`` adds (JEPA mask indices). With ``sequence: true`` a sample is a
patient's scans over time instead (:mod:`~data_modules.sequences`).

This module composes the parts, each in its own module: the rows and their features
(:mod:`~data_modules.manifest`, :mod:`~data_modules.ehr_features`,
:mod:`~data_modules.splits`), the samples and their collate (:mod:`~data_modules.dataset`),
the CT chain (:mod:`~data_modules.transforms`) and the caches (:mod:`~data_modules.cache`,
:mod:`~data_modules.streaming`). What is left here is the order they run in and the state
that a checkpoint carries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader

from data_modules.batch_augment import BatchAugment
from data_modules.cache import AtomicPersistentDataset, volume_cache_for
from data_modules.cache_fill import preload_volumes
from data_modules.compact_volume import expand
from data_modules.dataset import (
    BatchCollator,
    CodesView,
    CTEHRDataset,
    ReportingLoader,
    ReportingStreamLoader,
    volume_items,
)
from data_modules.ehr_features import feature_names, fit_ehr_stats, normalise_ehr, with_ehr_table
from data_modules.ehr_table import EHRJoin
from data_modules.label_subsets import LabelFractionError
from data_modules.manifest import RowProblems, read_table, resolve_image_paths, validate_manifest
from data_modules.roi import ROISpace, check_declared
from data_modules.sequences import (
    SequenceCollator,
    SequenceDataset,
    check_sequences,
    latest_scan_ids,
    latest_scans,
    require_scan_times,
)
from data_modules.split_summary import format_summary, split_summary, summary_warnings
from data_modules.splits import split_rows, with_splits
from data_modules.streaming import ShardedStream
from data_modules.transforms import CTAugment, CTPreprocess, ct_pipeline, pipeline_key

log = logging.getLogger(__name__)


@rank_zero_only
def _warn_rank_zero(message: str) -> None:
    log.warning(message)


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
            as int16 codes (``N * prod(image_size) * 2`` bytes, :mod:`~data_modules.compact_volume`);
            workers share it by fork.
        drop_last: drop the last incomplete training batch (streaming: see
            :mod:`data_modules.streaming` for what it means across ranks and workers).
        preprocess: the CT chain (orientation, target spacing, ROI crop, padding):
            :class:`~data_modules.transforms.CTPreprocess`; default: RAS orientation, each
            scan's own spacing, the whole volume.
        augment: training-split augmentation (:class:`~data_modules.transforms.CTAugment`);
            default none.
        augment_on: where ``augment`` runs: ``loader`` (per sample, MONAI transforms in the
            loader workers) or ``device`` (the same transforms as batched tensor ops on the
            training device after the batch transfer, :mod:`~data_modules.batch_augment`;
            the workers only read and collate: what keeps a GPU fed at 128³). The two give
            the same distribution of augmented volumes; not for ``sequence`` batches.
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
        label_fraction / label_subset_seed: keep the labels of only this fraction of the
            labelled training *patients* (seeded, stratified, nested across fractions; see
            :mod:`data_modules.label_subsets`); the others' training scans count as unlabelled.
        sequence: one sample per *patient* instead of per scan: the patient's scans in time
            order (``scan_time``), left-padded to ``max_scans``, with ``scan_mask`` and
            ``scan_times`` (days relative to the latest scan) and the latest scan's label;
            see :mod:`data_modules.sequences` for the batch keys and the manifest rules.
        max_scans: sequence mode: the latest ``max_scans`` scans of a patient are kept.
        roi_space: the coordinate space of ``roi_x/roi_y/roi_z``: ``ras_mm``, ``lps_mm``
            (what DICOM tools report) or ``voxel`` (indices of the stored array); see
            :mod:`data_modules.roi`. A ``roi_space`` column declares it per row instead. A
            manifest with ROI centres and neither is refused at setup: no default guess.
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
        augment_on: Literal["loader", "device"] = "loader",
        cache_dir: str | None = None,
        streaming: bool = False,
        stream_seed: int = 0,
        ehr_table: str | None = None,
        ehr_join: EHRJoin = "scan_id",
        label_fraction: float = 1.0,
        label_subset_seed: int = 0,
        sequence: bool = False,
        max_scans: int = 4,
        roi_space: ROISpace | None = None,
    ):
        super().__init__()
        if max_scans < 1:
            raise ValueError(f"max_scans must be at least 1, got {max_scans}")
        self.sequence = sequence
        self.max_scans = max_scans
        self.roi_space = check_declared(roi_space, "data.init_args")
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
        if augment_on not in ("loader", "device"):
            raise ValueError(f"augment_on must be 'loader' or 'device', got {augment_on!r}")
        if augment_on == "device" and sequence:
            raise ValueError(
                "augment_on: device does not take sequence batches (a patient's padded slots "
                "would be shifted too): use augment_on: loader with sequence: true"
            )
        self.augment = augment
        self.augment_on = augment_on
        self.device_augment = BatchAugment(augment) if augment and augment_on == "device" else None
        self.cache_dir = cache_dir
        self.streaming = streaming
        self.stream_seed = stream_seed
        self.ehr_table = ehr_table
        self.ehr_join = ehr_join
        self.collate_hook: Callable[[dict], dict] | None = None
        self.ehr_stats: dict[str, Any] | None = None
        self.problems = RowProblems()
        self._table: pd.DataFrame | None = None
        self._datasets: dict[str, CTEHRDataset | SequenceDataset] = {}
        self._cache: dict[tuple, torch.Tensor] | None = None

    # --- sizes a model needs before setup (LightningCLI links them into the model) -------
    @property
    def ehr_feature_names(self) -> list[str]:
        return feature_names(
            self.manifest, self.ehr_table, self.ehr_join, self.selected_ehr_columns
        )

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
        if self.sequence:
            require_scan_times(df, str(self.manifest), self.on_bad_sample)
        if self.ehr_table is not None:
            df = with_ehr_table(df, self.manifest, self.ehr_table, self.ehr_join, names)
        df = validate_manifest(
            df, str(self.manifest), names, self.on_bad_sample, self.problems,
            roi_space=self.roi_space,
        )  # fmt: skip
        df = with_splits(df, self.manifest, self.val_fraction, self.test_fraction, self.split_seed)
        if self.sequence:
            df = check_sequences(df, str(self.manifest), self.problems)
        df["image_path"] = resolve_image_paths(df, self.manifest)
        return df

    def setup(self, stage: str | None = None) -> None:
        if self._table is None:
            self._table = self.load_table()
            if self.problems.reasons:
                log.warning("manifest %s: %s", self.manifest, self.problems.summary())
            self.report_splits()
        if self.streaming and self.cache_volumes and self._cache is None:
            log.info("streaming: volumes are read per step (cache_volumes is not used)")
        if self.ehr_stats is None:
            self.ehr_stats = fit_ehr_stats(self._table, self.ehr_feature_names, self.manifest)
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
            latest = latest_scan_ids(rows) if self.sequence else None
            if self.cache_volumes and not self.streaming:
                rows = self.fill_cache(rows, name)
            ds = CTEHRDataset(
                rows, normalise_ehr(rows, self.ehr_stats), self.pipeline(), self.on_bad_sample,
                self._cache, self.disk_cache(rows), self.loader_augment(name),
                self.image_size,
            )  # fmt: skip
            if self.sequence:  # each scan augmented on its own, its volume cached once
                ds = SequenceDataset(ds, self.max_scans, latest, self.problems, name)
            self._datasets[name] = ds

    def loader_augment(self, split: str) -> CTAugment | None:
        """The per-sample augmentation a split's dataset runs: the training split's, unless
        it runs on the device."""
        return self.augment if split == "train" and self.augment_on == "loader" else None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``augment_on: device``: expand a training batch's int16 images and augment them
        where they now live."""
        if not (isinstance(batch, dict) and batch) or "image" not in batch:
            return batch
        batch["image"] = expand(batch["image"])  # int16 codes from the training loader
        trainer = self.trainer  # set by Lightning when the data module is attached
        if self.device_augment is not None and trainer is not None and trainer.training:
            batch["image"] = self.device_augment(batch["image"])
        return batch

    def report_splits(self) -> None:
        """Print what will be trained and evaluated on (patients, scans, labelled scans,
        positives per split and cohort) and warn about evaluation splits too small or
        one-class for a label-based metric (:mod:`~data_modules.split_summary`); rank 0."""
        summary = split_summary(self._table)
        unit = "patients as sequences" if self.sequence else "scans"
        fraction = (
            f"; label_fraction={self.label_fraction} keeps that share of the training labels"
            if self.label_fraction < 1
            else ""
        )
        rank_zero_info(f"data {self.manifest} ({unit}{fraction}):\n{format_summary(summary)}")
        for warning in summary_warnings(summary):
            _warn_rank_zero(f"manifest {self.manifest}: {warning}")

    def rows_for(self, name: str) -> pd.DataFrame:
        """The rows loader ``name`` reads (see :func:`~data_modules.splits.split_rows`; in
        sequence mode grouped by patient, the latest ``max_scans`` scans each)."""
        rows = split_rows(
            self._table, name, self.manifest, self.predict_split, self.label_fraction,
            self.label_subset_seed, self.require_labels, self.sequence,
        )  # fmt: skip
        return latest_scans(rows, self.max_scans) if self.sequence else rows

    def pipeline(self):
        """The deterministic preprocessing chain (MONAI transforms)."""
        return ct_pipeline(self.image_size, self.hu_window, self.preprocess)

    def disk_cache(self, rows: pd.DataFrame) -> AtomicPersistentDataset | None:
        if self.cache_dir is None:
            return None
        key = pipeline_key(self.image_size, self.hu_window, self.preprocess)
        return AtomicPersistentDataset(volume_items(rows), self.pipeline(), self.cache_dir, key)

    def fill_cache(self, rows: pd.DataFrame, name: str) -> pd.DataFrame:
        """Decode + preprocess every volume of ``rows`` once into the RAM cache (through the
        disk cache when there is one), over ``num_workers`` processes and, with a disk
        cache, split over DDP ranks (:mod:`~data_modules.cache_fill`); returns the rows
        whose volume could be read."""
        if self._cache is None:
            self._cache = volume_cache_for(
                pipeline_key(self.image_size, self.hu_window, self.preprocess)
            )
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (None, None)
        return preload_volumes(
            rows, self._cache, self.pipeline(), self.disk_cache(rows), self.on_bad_sample,
            self.problems, name, self.num_workers, rank, world,
        )  # fmt: skip

    # --- checkpoint state: EHR statistics (fitted on train only), preprocessing, masks -----
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
            scans = ds.scans if isinstance(ds, SequenceDataset) else ds
            scans.ehr = normalise_ehr(scans.table, self.ehr_stats)

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

    def dataset(self, name: str) -> CTEHRDataset | SequenceDataset:
        """The split's dataset: per scan, or per patient in sequence mode (its ``table`` is
        then one row per patient, the latest scan, and ``scans`` the per-scan dataset)."""
        return self._datasets[name]

    # --- loaders --------------------------------------------------------------------------
    def _loader(self, name: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if name not in self._datasets:
            self.setup({"train": "fit", "val": "fit", "test": "test", "predict": "predict"}[name])
        ds = self._datasets[name]
        if name == "train" and self.device_augment is not None and not self.streaming:
            ds = CodesView(ds)  # int16 images; expanded and augmented after the transfer
        common = dict(
            report_name=f"{name} split",
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=(SequenceCollator if self.sequence else BatchCollator)(self.collate_hook),
        )
        if not self.streaming:
            return ReportingLoader(
                ds,
                shuffle=shuffle,
                sampler=None if name == "train" else self.eval_sampler(ds, name),
                drop_last=drop_last and len(ds) > self.batch_size,
                **common,
            )
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (None, None)
        stream = ShardedStream(
            ds, shuffle=shuffle, seed=self.stream_seed, drop_last=drop_last,
            batch_size=self.batch_size, num_workers=self.num_workers, rank=rank, world_size=world,
        )  # fmt: skip
        epoch_fn = (lambda: trainer.current_epoch) if trainer else None
        return ReportingStreamLoader(stream, epoch_fn=epoch_fn, **common)

    def eval_sampler(
        self, ds: CTEHRDataset | SequenceDataset, name: str
    ) -> UnrepeatedDistributedSampler | None:
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
            unit = "patients" if self.sequence else "scans"
            raise ValueError(
                f"manifest {self.manifest}: the {name!r} split has {len(ds)} {unit} for "
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
