"""A callback the multi-process tests add with ``--trainer.callbacks+=tests.rank_recorder...``.

Each rank writes what it saw to ``<out_dir>/<stage>_rank<r>.pt``: the scans of each training
epoch, the masks of its first batches, its rank-local share of the validation states (read
before the task's epoch-end hook gathers them), the test scans, its final weights and the
metrics it logged. The tests then compare ranks with each other and with a recomputation.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

MASK_KEYS = ("ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx", "jepa_mode")


def _tensor_list(metric) -> list[torch.Tensor]:
    return [t.detach().cpu() for t in metric] if isinstance(metric, list) else [metric.cpu()]


class RankRecorder(L.Callback):
    def __init__(self, out_dir: str, n_mask_batches: int = 3):
        self.out_dir = Path(out_dir)
        self.n_mask_batches = n_mask_batches
        self.train_scans: dict[int, list[str]] = defaultdict(list)
        self.masks: list[dict] = []
        self.val: list[dict] = []
        self.test_scans: list[tuple[str, str]] = []
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_scans[trainer.current_epoch].extend(batch.get("scan_id", []))  # {}: all skipped
        if len(self.masks) < self.n_mask_batches and "ctx_image_idx" in batch:
            self.masks.append({k: batch[k] for k in MASK_KEYS})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Callbacks run before the LightningModule's hook: these are still rank-local.
        record = {"epoch": trainer.current_epoch, "sanity": trainer.sanity_checking}
        if hasattr(pl_module, "val_embeddings"):
            record["embeddings"] = _tensor_list(pl_module.val_embeddings.value)
            record["probe_preds"] = _tensor_list(pl_module.val_probe_auroc.preds)
            record["probe_target"] = _tensor_list(pl_module.val_probe_auroc.target)
        self.val.append(record)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val[-1]["metrics"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test_scans.extend(zip(batch["scan_id"], batch["cohort"], strict=True))

    def _write(self, trainer, pl_module, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "node_rank": trainer.node_rank,
                "slurm_node": os.environ.get("SLURMD_NODENAME"),
                "global_step": trainer.global_step,
                "train_scans": dict(self.train_scans),
                "masks": self.masks,
                "val": self.val,
                "test_scans": self.test_scans,
                "losses": self.losses,
                "state_dict": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            },
            self.out_dir / f"{stage}_rank{trainer.global_rank}.pt",
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")


class StepLossLog(L.Callback):
    """Appends ``global_step loss`` per optimizer step to a text file, flushed at once, so
    the lines written before a ``kill -9`` survive it."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {float(loss)!r}\n")


class KillAt(L.Callback):
    """SIGKILLs its own process after optimizer step ``step``: a deterministic ``kill -9``
    in the middle of an epoch (no cleanup, no checkpoint of its own)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
