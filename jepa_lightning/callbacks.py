"""Callbacks the CLI adds to every run.

:class:`SelectingCheckpoint` is Lightning's ``ModelCheckpoint`` that survives an archive
without labelled validation scans (the monitored probe metric is then never logged).
:class:`RNGStateCheckpoint` makes resumed runs draw the same random numbers as uninterrupted
ones. :class:`PredictionWriter` turns ``predict`` into a file: one Parquet row per scan with its
identifiers, label, predicted probability and backbone embedding, so statistics, plots and
studies read predictions from disk instead of re-running models.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from jepa_lightning.data_contract import TakesCollateHook, check_batch, has_capability

log = logging.getLogger(__name__)

ID_COLUMNS = ("scan_id", "patient_id", "cohort")
REQUIRED_KEYS = (*ID_COLUMNS, "label", "prob", "embedding")


def rank_part_path(output: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its share before rank 0 merges them."""
    return output.with_name(f".{output.name}.rank{rank}.parquet")


def merge_rank_parts(parts: list[Path]) -> pd.DataFrame:
    """The predictions of every rank as one table, one row per scan.

    Under DDP the ``DistributedSampler`` pads the last ranks with repeats of the first scans
    so every rank gets as many batches; those repeats are dropped here (a scan is predicted
    identically wherever it lands, the model being in eval mode)."""
    frames = [pd.read_parquet(p) for p in parts]
    table = pd.concat(frames, ignore_index=True)
    return table.drop_duplicates("scan_id", keep="first").reset_index(drop=True)


def write_parquet_atomically(table: pd.DataFrame, path: Path) -> None:
    """Write to a hidden sibling then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def predictions_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Batches of ``predict_step`` outputs -> a table with ``emb_0 .. emb_{C-1}`` columns."""
    if not rows:
        return pd.DataFrame(columns=[*ID_COLUMNS, "label", "prob"])
    emb = np.concatenate([r["embedding"] for r in rows])
    table = pd.DataFrame(
        {
            **{k: [v for r in rows for v in r[k]] for k in ID_COLUMNS},
            "label": np.concatenate([r["label"] for r in rows]),
            "prob": np.concatenate([r["prob"] for r in rows]),
        }
    )
    embeddings = pd.DataFrame(emb, columns=[f"emb_{i}" for i in range(emb.shape[1])])
    return pd.concat([table, embeddings], axis=1)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs to ``output`` (Parquet): ``scan_id, patient_id, cohort,
    label, prob, emb_0 .. emb_{C-1}``, one row per scan, in the predict loader's order.

    The task's ``predict_step`` must return a dict with ``scan_id``, ``patient_id``,
    ``cohort`` (lists of str), ``label`` and ``prob`` (``[B]``) and ``embedding``
    (``[B, C]``, the pooled backbone features the head sees).

    Under DDP every rank writes its share to a hidden part file beside ``output``; after a
    barrier rank 0 merges them (dropping the sampler's padding repeats), writes ``output``
    and removes the parts. ``output`` is written atomically.

    Args:
        output: Parquet path; the CLI defaults it to ``<default_root_dir>/predictions.parquet``.
        overwrite: replace an existing ``output``; by default ``predict`` refuses to start.
    """

    def __init__(self, output: str | None = None, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output = output
        self.overwrite = overwrite
        self._rows: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        if not self.output:
            raise ValueError(
                "PredictionWriter has no output path: pass --predictions.output=<file>.parquet"
            )
        return Path(self.output)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path
        if path.suffix != ".parquet":
            raise ValueError(f"--predictions.output={path} must end in .parquet")
        if path.exists() and not self.overwrite:
            raise FileExistsError(
                f"{path} exists; predict will not overwrite it: choose another "
                "--predictions.output or pass --predictions.overwrite=true"
            )
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not prediction:  # every scan of the batch was skipped (on_bad_sample: skip)
            return
        if not isinstance(prediction, dict) or any(k not in prediction for k in REQUIRED_KEYS):
            got = sorted(prediction) if isinstance(prediction, dict) else type(prediction).__name__
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step must return a dict with "
                f"{list(REQUIRED_KEYS)} for PredictionWriter; it returned {got}"
            )

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().float().cpu().numpy()

        self._rows.append(
            {
                **{k: [str(v) for v in prediction[k]] for k in ID_COLUMNS},
                "label": arr(prediction["label"]),
                "prob": arr(prediction["prob"]),
                "embedding": arr(prediction["embedding"]).reshape(len(prediction["prob"]), -1),
            }
        )

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        table = predictions_frame(self._rows)
        self._rows = []
        if trainer.world_size == 1:
            write_parquet_atomically(table, path)
            log.info("wrote %d predictions to %s", len(table), path)
            return
        write_parquet_atomically(table, rank_part_path(path, trainer.global_rank))
        trainer.strategy.barrier("predictions_written")
        if trainer.global_rank == 0:
            parts = [rank_part_path(path, r) for r in range(trainer.world_size)]
            merged = merge_rank_parts(parts)
            write_parquet_atomically(merged, path)
            for p in parts:
                p.unlink()
            log.info("merged %d predictions from %d ranks into %s", len(merged), len(parts), path)
        trainer.strategy.barrier("predictions_merged")


class SelectingCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best-epoch selection switches itself off, with one log line,
    when the monitored metric is never logged, instead of killing the run.

    Why: pretraining configs select the epoch by ``val/probe_auroc``, the online probe on
    *labelled* validation scans. On an unlabelled archive (no ``label`` column, or labels only
    in the training split) every task skips that metric, and Lightning's own
    ``ModelCheckpoint`` then raises at the end of the first validation epoch, before any
    checkpoint is written. Here the first validation end without the key logs why, and the
    callback continues as ``monitor=None``: with ``save_last`` (the CLI default) only
    ``last.ckpt`` is kept, updated every epoch; without it the latest epoch is kept. The
    decision is taken on metrics every rank computed alike (the tasks count labelled scans
    over all ranks), so DDP ranks switch together.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Public hooks only: a validation (not the sanity check) has just logged what it
        # logs, and ModelCheckpoint would now look the monitor up among the same metrics.
        if (
            not trainer.sanity_checking
            and self.monitor is not None
            and self.monitor not in trainer.callback_metrics
        ):
            self._switch_off_selection(trainer, dict(trainer.callback_metrics))
        super().on_validation_end(trainer, pl_module)

    def _switch_off_selection(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        counts = getattr(trainer.datamodule, "labelled_counts", None)
        why = ""
        if callable(counts):
            by_split = counts()
            why = f" (labelled scans per split: {by_split})"
            if not by_split.get("val"):
                why = (
                    f": the validation split has no labelled scan{why}, so the online probe is off"
                )
        keep = "last.ckpt only, updated every epoch" if self.save_last else "the latest epoch"
        rank_zero_info(
            f"checkpoint: {self.monitor!r} was not logged{why}; best-epoch selection is off "
            f"and the checkpoint falls back to {keep} (logged: {sorted(monitor_candidates)})"
        )
        self.monitor = None
        self.save_top_k = 0 if self.save_last else 1
        # filename templates may name the metric; the fallback file must still be writable
        self.filename = None if self.filename and "{" in self.filename else self.filename


def _numpy_state() -> tuple:
    """NumPy's global state in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (
        str(name),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )


class RNGStateCheckpoint(L.Callback):
    """Saves the process's random streams (torch CPU, CUDA, NumPy, Python) in every checkpoint
    and restores them on resume, so a run resumed with ``--ckpt_path`` draws the same shuffles,
    dropout and augmentation as the uninterrupted run from the checkpointed step on (Lightning
    re-seeds at start-up but does not restore streams). The JEPA mask stream travels with the
    data module's state. Exact for checkpoints taken at epoch ends with ``num_workers: 0``;
    loader workers keep streams of their own. Under DDP rank 0's streams are saved; every rank
    is seeded alike anyway, and the mask streams stay distinct per rank.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class DataContract(L.Callback):
    """The task's side of the data contract (:mod:`jepa_lightning.data_contract`): checks
    the first batch of each loop against the documented keys, and installs the task's
    ``collate_hook()`` (e.g. JEPA's mask collator) as the data module's ``collate_hook``, so
    masks are drawn in the loader workers.

    Why a callback: the task and the data module stay unaware of each other, and the link
    is made once where the run is assembled (every task returns this callback from
    ``configure_callbacks``, so the CLI and a hand-built ``Trainer`` both get it). At
    ``setup`` the rank is known (the collator seeds its mask stream with it) and no loader
    has been built yet. A data module without a ``collate_hook`` attribute (a user's own, or
    plain dataloaders) is told so in one log line, and the hook is applied here instead, in
    the main process at the start of each batch (the new keys moved to the batch's device).
    """

    def __init__(self) -> None:
        self.step_hook = None
        self.checked: set[str] = set()
        self.hook_needed: dict[str, bool] = {}  # per loop: does the batch lack what it adds?

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        make_hook = getattr(pl_module, "collate_hook", None)
        self.step_hook, self.hook_needed = None, {}
        if make_hook is None:
            return
        dm = getattr(trainer, "datamodule", None)
        hook = make_hook()
        without = (
            f"{type(pl_module).__name__} applies its collate_hook (masks) in the main process "
            "at the start of each batch, not in the loader workers"
        )
        if has_capability(dm, TakesCollateHook, without):
            dm.collate_hook = hook
        else:
            self.step_hook = hook

    def _batch_start(self, loop: str, batch: Any, device: torch.device) -> None:
        if loop not in self.checked:
            check_batch(batch, f"the first {loop} batch", predict=loop == "predict")
            self.checked.add(loop)
        if self.step_hook is None or not batch or self.hook_needed.get(loop) is False:
            return
        out = self.step_hook(dict(batch))
        if loop not in self.hook_needed:
            # A pipeline that already adds what the hook adds (e.g. masks drawn by the user's
            # own collate function) keeps its own: the hook applies only to batches without.
            self.hook_needed[loop] = bool(set(out) - set(batch))
            if not self.hook_needed[loop]:
                return
        for key, value in out.items():
            if key not in batch or value is not batch[key]:
                batch[key] = value.to(device) if isinstance(value, torch.Tensor) else value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start("training", batch, pl_module.device)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("validation", batch, pl_module.device)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("test", batch, pl_module.device)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("predict", batch, pl_module.device)
