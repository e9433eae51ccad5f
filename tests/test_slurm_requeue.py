"""SlurmRequeue on one process with SLURM's variables faked: the signal only sets a flag; the
checkpoint, the stop and the requeue happen at the next training-step boundary. (The real
SLURM + DDP run of the same path is ``tests/test_slurm.py``, marked slow.)"""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.demos.boring_classes import BoringModel

from jepa_lightning import slurm_requeue
from jepa_lightning.slurm_requeue import SlurmRequeue, next_hpc_checkpoint_path, slurm_job_id

SLURM_VARS = dict(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                  SLURM_JOB_ID="4242", SLURM_JOB_NAME="requeue-test", SLURM_NODELIST="localhost")  # fmt: skip


class SignalBeforeBatch(L.Callback):
    """Sends SIGUSR1 to this process just before the batch at ``step`` and records which
    handler was installed then."""

    def __init__(self, step: int):
        self.step = step
        self.handler_during_training = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.handler_during_training = signal.getsignal(signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def slurm_vars(monkeypatch):
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


@pytest.fixture
def requeued(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(slurm_requeue, "requeue_job", lambda job: calls.append(job) or True)
    return calls


def fit(tmp_path, *callbacks, environment=None) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=20, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[environment or SLURMEnvironment()], callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(BoringModel())
    return trainer


def test_signal_checkpoints_stops_and_requeues_at_the_next_step_boundary(
    slurm_vars, requeued, tmp_path
):
    before = signal.getsignal(signal.SIGUSR1)
    requeue, sender = SlurmRequeue(), SignalBeforeBatch(step=3)
    trainer = fit(tmp_path, requeue, sender)
    # the handler in place was ours, not Lightning's (which checkpoints inside the handler)
    assert getattr(sender.handler_during_training, "__self__", None) is requeue
    assert trainer.global_step == 4  # the signalled batch finished its step, then it stopped
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert requeued == ["4242"]
    assert signal.getsignal(signal.SIGUSR1) is before  # restored after fit


def test_a_second_fit_with_the_same_callback_and_environment_still_requeues(
    slurm_vars, requeued, tmp_path
):
    environment, requeue = SLURMEnvironment(), SlurmRequeue()
    fit(tmp_path, requeue, SignalBeforeBatch(step=3), environment=environment)
    trainer = fit(tmp_path, requeue, SignalBeforeBatch(step=5), environment=environment)
    assert trainer.global_step == 6
    assert torch.load(tmp_path / "hpc_ckpt_2.ckpt", weights_only=True)["global_step"] == 6
    assert requeued == ["4242", "4242"]


def test_without_a_signal_nothing_is_saved_or_requeued(slurm_vars, requeued, tmp_path):
    trainer = fit(tmp_path, SlurmRequeue())
    assert trainer.global_step == 20
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt")) and requeued == []


def test_disabled_leaves_lightnings_auto_requeue_in_place(slurm_vars, requeued, tmp_path):
    environment = SLURMEnvironment()
    fit(tmp_path, SlurmRequeue(enabled=False), environment=environment)
    assert environment.auto_requeue is True
    environment = SLURMEnvironment()
    fit(tmp_path, SlurmRequeue(), environment=environment)
    assert environment.auto_requeue is False


def test_hpc_checkpoint_numbering_and_job_ids(tmp_path, monkeypatch):
    assert next_hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    for n in (1, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_9.ckpt.partial").touch()
    assert next_hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_4.ckpt"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "70_3"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3; rm -rf /")
    with pytest.raises(ValueError, match="unexpected SLURM job id"):
        slurm_job_id()


def test_requeue_without_scontrol_warns_instead_of_crashing(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm_requeue.requeue_job("12") is False
    assert "scontrol not found" in caplog.text
