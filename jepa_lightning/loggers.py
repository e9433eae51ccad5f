"""Weights & Biases logging that works on a laptop, a cluster node without internet, and CI."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_should_be_offline() -> bool:
    """Offline unless an API key is configured (``WANDB_API_KEY`` or ``wandb login``'s netrc
    entry); ``WANDB_MODE=offline``/``disabled`` always wins. Offline runs are kept under
    ``save_dir`` and can be uploaded later with ``wandb sync``."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
        return netrc.netrc(path).authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with this project's defaults; ``offline: null`` decides by
    :func:`wandb_should_be_offline`, so a config never needs editing between machines.

    Args:
        project / name / group / job_type / tags / notes: the W&B run's labels.
        save_dir: where run files (and offline runs) go.
        offline: force offline (true) / online (false); null = automatic.
        log_model: upload checkpoints as W&B artifacts (false: they stay on disk).
    """

    def __init__(
        self,
        project: str = "jepa-lightning",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        save_dir: str = "runs/wandb",
        offline: bool | None = None,
        log_model: bool = False,
    ):
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=wandb_should_be_offline() if offline is None else offline,
            log_model=log_model,
            group=group,
            job_type=job_type,
            tags=tags,
            notes=notes,
        )


class SaveConfigToLoggers(SaveConfigCallback):
    """Saves the resolved config beside the logs (as LightningCLI does) and also into each
    W&B run's config, so runs of a sweep can be compared by any key.

    A run folder that already holds a ``config.yaml`` (a re-run into the same
    ``default_root_dir`` with another logger, or with ``logger: false``, whose log dir is
    the run folder itself) gets ``config_1.yaml``, ``config_2.yaml``, ...: the earlier
    run's config is kept, and the run does not abort as LightningCLI's callback would."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            name = self.config_filename
            log_dir = Path(trainer.log_dir)  # every rank: it broadcasts
            if trainer.is_global_zero:
                stem, suffix = Path(name).stem.split("_")[0], Path(name).suffix
                n = 0
                while (log_dir / name).exists():
                    n += 1
                    name = f"{stem}_{n}{suffix}"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)
