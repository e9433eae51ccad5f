"""CTEHRDataModule: any manifest of CT volumes + EHR vectors -> batches of plain tensors.

A batch is a dict: ``image [B, 1, D, H, W]`` in [0, 1], ``ehr [B, F]`` (z-scored with
training-split statistics; NaN = missing), ``ehr_missing [B, F]`` bool, ``label [B]``
(NaN = unlabelled), ``patient_id``/``scan_id``/``cohort`` lists of str, plus whatever
the task's ``collate_hook`` adds (JEPA mask indices).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from data_modules.label_subsets import LabelFractionError, apply_label_fraction
from data_modules.manifest import (
    RowProblems,
    assign_patient_splits,
    ehr_columns,
    read_table,
    resolve_image_paths,
    table_columns,
    validate_manifest,
)
from data_modules.transforms import BadSampleError, ct_preprocess, load_ct_volume, preprocess_volume

log = logging.getLogger(__name__)


class CTEHRDataset(Dataset):
    """Scans of one split. Volumes come from the in-memory cache when one was built."""

    def __init__(
        self,
        table: pd.DataFrame,
        ehr: np.ndarray,
        transform,
        on_bad_sample: str,
        cache: dict[str, torch.Tensor] | None,
    ):
        self.table = table.reset_index(drop=True)
        self.ehr = ehr  # [N, F] normalised, NaN = missing
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.cache = cache
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.table)

    def volume(self, i: int) -> torch.Tensor:
        path = self.table["image_path"].iloc[i]
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        return preprocess_volume(load_ct_volume(path), self.transform)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        row = self.table.iloc[i]
        try:
            image = self.volume(i)
        except BadSampleError as err:
            if self.on_bad_sample == "raise":
                raise BadSampleError(f"{err} (manifest row scan_id={row['scan_id']!r})") from err
            self.skipped.append(str(err))
            log.warning(
                "skipping scan %s (%d skipped in this process): %s",
                row["scan_id"],
                len(self.skipped),
                err,
            )
            return None
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


class BatchCollator:
    """Drops skipped (None) samples, collates, then lets the task add its extras."""

    def __init__(self, hook: Callable[[dict], dict] | None = None):
        self.hook = hook

    def __call__(self, samples: list[dict | None]) -> dict:
        samples = [s for s in samples if s is not None]
        if not samples:
            return {}
        batch = default_collate(samples)
        return self.hook(batch) if self.hook is not None else batch


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
        self.collate_hook: Callable[[dict], dict] | None = None
        self.ehr_stats: dict[str, Any] | None = None
        self.problems = RowProblems()
        self._table: pd.DataFrame | None = None
        self._datasets: dict[str, CTEHRDataset] = {}
        self._cache: dict[str, torch.Tensor] | None = None

    # --- sizes a model needs before setup (LightningCLI links them into the model) -------
    @property
    def ehr_feature_names(self) -> list[str]:
        return ehr_columns(table_columns(self.manifest), self.selected_ehr_columns)

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
        df = validate_manifest(
            read_table(self.manifest), str(self.manifest), names, self.on_bad_sample, self.problems
        )
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
            if self.cache_volumes:
                rows = self.fill_cache(rows, name)
            self._datasets[name] = CTEHRDataset(
                rows, self.normalise_ehr(rows), ct_preprocess(self.image_size, self.hu_window),
                self.on_bad_sample, self._cache,
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

    def fill_cache(self, rows: pd.DataFrame, name: str) -> pd.DataFrame:
        """Decode + preprocess every volume of ``rows`` once. Bad files raise or are dropped."""
        if self._cache is None:
            self._cache = {}
        transform = ct_preprocess(self.image_size, self.hu_window)
        keep = np.ones(len(rows), dtype=bool)
        todo = [(i, p) for i, p in enumerate(rows["image_path"]) if p not in self._cache]
        for i, path in tqdm(todo, desc=f"loading {name} volumes", disable=not todo, leave=False):
            try:
                self._cache[path] = preprocess_volume(load_ct_volume(path), transform)
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
        return {"ehr_stats": self.ehr_stats}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reuse the statistics a checkpoint was trained with (resume, test, predict)."""
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
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last and len(ds) > self.batch_size,
            collate_fn=BatchCollator(self.collate_hook),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
