"""SLURM auto-requeue that checkpoints at a training-step boundary every rank agrees on.

Lightning's own auto-requeue (``SLURMEnvironment(auto_requeue=True)``) saves the HPC
checkpoint *inside the SIGUSR1 handler*. A signal handler runs between any two Python
bytecodes, so under DDP each rank enters ``save_checkpoint`` (and its barrier) at a different
point of its step, possibly while the other rank waits in a gradient all-reduce: the
collectives no longer match and the job hangs until SLURM kills it, with no checkpoint
(Lightning-AI/pytorch-lightning#21406; we hit it in ``tests/test_slurm.py``).

:class:`SlurmRequeue` turns that off and does the same job safely: the handler only sets a
flag; after each training batch the ranks OR their flags (one scalar all-reduce,
``strategy.reduce_boolean_decision``), and when any rank was signalled all of them save
``<default_root_dir>/hpc_ckpt_<n>.ckpt`` together, stop, and rank 0 runs ``scontrol requeue``.
``--ckpt_path last`` then resumes from that file (see :mod:`jepa_lightning.checkpoints`).

Training batches are the only place checked: every rank runs the same number of them, while
validation shares can differ by one batch. So the signal's lead time (``--signal=USR1@90``
in the templates) must cover one training step, a checkpoint write, and a validation epoch
if one can be running when the signal arrives.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from jepa_lightning.lightning_internals import cluster_environment

log = logging.getLogger(__name__)


def next_hpc_checkpoint_path(root: str | Path) -> Path:
    """``<root>/hpc_ckpt_<n+1>.ckpt`` after the highest ``n`` already there (Lightning's naming,
    which ``--ckpt_path last`` and ``--ckpt_path hpc`` look for)."""
    versions = [
        int(m.group(1))
        for p in Path(root).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return Path(root) / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ["SLURM_JOB_ID"]
    )
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}: not requeueing")
    return job


def requeue_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; False (and a warning) when it fails."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning(
            "scontrol not found on PATH: job %s saved its checkpoint but is not requeued", job_id
        )
        return False
    if result.returncode:
        log.warning(
            "scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip()
        )
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class SlurmRequeue(L.Callback):
    """Checkpoint and requeue on SLURM's warning signal, at a step boundary (see module doc).

    Args:
        enabled: ``false`` leaves Lightning's own auto-requeue in place.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._signal: signal.Signals | None = None
        self._previous_handler = None
        self._signalled = False
        self.saved_path: Path | None = None

    @property
    def active(self) -> bool:
        return self._signal is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # single-device strategies hold no cluster environment; the connector always does
        env = cluster_environment(trainer)
        if stage != "fit" or not self.enabled or not isinstance(env, SLURMEnvironment):
            return
        if not env.auto_requeue or env.requeue_signal is None:
            return  # the user turned requeueing off on the plugin: respect it
        # Runs before Lightning registers its signal handlers (Trainer._run): with this off it
        # registers none for the requeue signal.
        env.auto_requeue = False
        self._signal = env.requeue_signal

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self._signalled = False
            self.saved_path = None
            self._previous_handler = signal.signal(self._signal, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: anything more here could run in the middle of a collective.
        self._signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active or self.saved_path is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = trainer.strategy.broadcast(next_hpc_checkpoint_path(trainer.default_root_dir), src=0)
        log.info("SLURM requeue signal: saving %s at step %d", path, trainer.global_step)
        trainer.save_checkpoint(path)  # every rank is here: the barriers inside match
        self.saved_path = Path(path)
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.active:
            return
        if self._previous_handler is not None:
            signal.signal(self._signal, self._previous_handler)
            self._previous_handler = None
        # Requeued only now, once training has stopped on every rank: SLURM then signals the
        # job's processes to end, which must not hit a rank still inside a collective.
        if self.saved_path is not None and trainer.is_global_zero:
            requeue_job(slurm_job_id())
