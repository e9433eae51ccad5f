"""Callbacks the DDP baseline tests add through ``--trainer.callbacks`` (importable by the
ranks Lightning launches, which re-run the CLI command line).

:class:`RotateValLabels` gives each validation epoch another layout of labelled scans: epoch
0 none anywhere, epoch 1 only on rank 0 (both classes), epoch 2 on every scan. One 3-epoch
run therefore meets the three archives of issue 18 in turn, including the first-epoch case
where the checkpoint's monitored probe metric is missing.
:class:`SkipBarrierOnRank1` makes the ranks disagree on a collective on purpose, to show the
process-group timeout ends such a run.
"""

from __future__ import annotations

import lightning as L
import numpy as np

# UnrepeatedDistributedSampler deals validation position i to rank i % 2 (2 ranks, 6 scans).
LAYOUTS = {
    0: [np.nan] * 6,  # absent everywhere
    1: [1.0, np.nan, 0.0, np.nan, 1.0, np.nan],  # only rank 0 holds labelled scans
    2: [1.0, 0.0, 0.0, 1.0, 1.0, 0.0],  # present everywhere
}


class RotateValLabels(L.Callback):
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = trainer.datamodule.dataset("val").table
        if len(table) != 6:
            raise ValueError(f"RotateValLabels needs a 6-scan validation split, got {len(table)}")
        table["label"] = np.asarray(LAYOUTS[trainer.current_epoch % 3], dtype=np.float32)


class SkipBarrierOnRank1(L.Callback):
    """Rank 0 waits in a barrier that rank 1 never enters (rank 1 goes on to the next
    collective of training): without a process-group timeout this hangs for good."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.global_rank == 0:
            trainer.strategy.barrier("only rank 0 arrives")
