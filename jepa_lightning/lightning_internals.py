"""Every use of Lightning's private internals, in one place, each with the reason no public
API serves and a test (``tests/test_lightning_internals.py``) that fails loudly when a
Lightning release renames or removes it.

What is *not* here, because it is public: ``LightningModule.backward`` (a documented hook
``BaseTask`` overrides for DDP), ``ModelCheckpoint.on_validation_end`` (``SelectingCheckpoint``),
``strategy.checkpoint_io`` and ``LightningModule.trainer`` (``BaseTask.attached_trainer``).

``pyproject.toml`` pins lightning to the range these were tested on; ``make test-upgrade``
runs the suite with the newest releases that range allows. Anything here that a release
breaks should fail that suite, not a user's training run.
"""

from __future__ import annotations

from datetime import timedelta

import lightning as L
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import DDPStrategy


def set_ddp_timeout(strategy: DDPStrategy, timeout: timedelta) -> None:
    """The collective timeout of a DDP strategy the CLI has already built from its config.

    Public API takes it only at construction (``DDPStrategy(timeout=...)``), while the CLI
    builds the strategy from a string (``--trainer.strategy=ddp``); the attribute is read
    when the process group is created, in ``trainer.fit``, so setting it before then works.
    """
    if not hasattr(strategy, "_timeout"):
        raise RuntimeError(
            "this Lightning release has no DDPStrategy._timeout: ddp_timeout_s cannot be "
            "applied (see jepa_lightning/lightning_internals.py)"
        )
    strategy._timeout = timeout


def logger_writes_this_step(trainer: L.Trainer) -> bool:
    """Whether values logged in this training step reach the logger.

    Lightning decides it in its logger connector (``log_every_n_steps``, the last step);
    re-deriving it from ``global_step`` goes wrong after a mid-epoch resume. Without the
    attribute we log every step: slower, never wrong.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """The run's cluster environment (SLURM or not), also on one device.

    ``trainer.strategy.cluster_environment`` exists only for parallel strategies; a
    one-GPU SLURM job runs a single-device strategy and still needs its requeue signal.
    """
    return trainer._accelerator_connector.cluster_environment
