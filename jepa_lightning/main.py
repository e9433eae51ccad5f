"""The command line: ``python -m jepa_lightning {fit,validate,test,predict} --config a.yaml``.

A LightningCLI in subclass mode: ``model`` is any task (``MultimodalJEPA``,
``DiagnosisTask``, ...) and ``data`` any data module (``SyntheticCohortDataModule``,
``CTEHRDataModule``), by short class name. The data module's ``image_size`` and
``n_ehr_features`` are linked into the model, so they are set in one place.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

# Imported so their classes resolve by short name in configs.
import data_modules.ct_ehr  # noqa: F401
import data_modules.synthetic  # noqa: F401
import jepa_lightning.tasks  # noqa: F401
from jepa_lightning import __version__
from jepa_lightning.callbacks import (
    PredictionWriter,
    RNGStateCheckpoint,
    SelectingCheckpoint,
)
from jepa_lightning.checkpoints import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    check_checkpoint,
    resolve_last,
)
from jepa_lightning.lightning_internals import set_ddp_timeout
from jepa_lightning.loggers import SaveConfigToLoggers
from jepa_lightning.slurm_requeue import SlurmRequeue
from jepa_lightning.tasks.base import BaseTask
from jepa_lightning.user_errors import config_error_message, run_reporting_user_errors

# torch's own default for the process group, stated here so it is a documented knob: a rank
# that waits longer than this in one collective raises and Lightning stops every rank.
DEFAULT_DDP_TIMEOUT_S = 1800.0


class JEPALightningCLI(LightningCLI):
    """LightningCLI with our defaults: a ModelCheckpoint (``--checkpoint.*``, ``save_last``)
    writing to ``<default_root_dir>/checkpoints`` so a requeued job finds ``last.ckpt``,
    data -> model links, and ``--version``."""

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"jepa-lightning {__version__}")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # one short message naming the YAML file, no usage dump
            print(config_error_message(str(err), argv), file=sys.stderr)
            raise SystemExit(2) from None
        # Before LightningCLI reads the checkpoint's hyperparameters: a missing or truncated
        # file must be named in one line, not inside an internal zip-reader traceback.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc") and "://" not in str(ckpt):
            try:
                check_checkpoint(ckpt)
            except FileNotFoundError:
                raise SystemExit(
                    f"error: --ckpt_path {ckpt} does not exist: give the path of a .ckpt file "
                    "(e.g. <default_root_dir>/checkpoints/last.ckpt) or --ckpt_path last"
                ) from None
            except CorruptCheckpointError as err:
                raise SystemExit(f"error: {err}") from None
        limit = self.config[sub].get("trainer", {}).get("limit_val_batches") if sub else None
        if limit == 1 and isinstance(limit, int):
            rank_zero_info(
                "--trainer.limit_val_batches 1 means ONE validation batch (an int counts "
                "batches); write 1.0 for the whole validation split"
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # ``--checkpoint.*`` is Lightning's ModelCheckpoint; its monitor switches itself off
        # (one log line, last.ckpt kept) when an unlabelled archive never logs the metric.
        parser.add_lightning_class_args(SelectingCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RNGStateCheckpoint, "rng_state")
        # SLURM's USR1: checkpoint + requeue at a step boundary (Lightning's own handler can
        # deadlock DDP ranks); ``--requeue.enabled false`` keeps Lightning's.
        parser.add_lightning_class_args(SlurmRequeue, "requeue")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--ddp_timeout_s",
            type=float,
            default=DEFAULT_DDP_TIMEOUT_S,
            help="DDP: seconds a rank waits in one collective (all-reduce, all-gather, barrier) "
            "for the others before the run fails with a timeout error instead of hanging",
        )
        # ``predict`` writes a Parquet file (--predictions.output, --predictions.overwrite).
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.link_arguments(
            "data.image_size", "model.init_args.image_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.n_ehr_features", "model.init_args.n_ehr_features", apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in ("validate", "test", "predict") and not config.get("ckpt_path"):
            raise SystemExit(
                f"error: '{self.subcommand}' needs --ckpt_path (e.g. <default_root_dir>/checkpoints/"
                "last.ckpt); without it the model would be evaluated with untrained weights"
            )
        root = config.trainer.default_root_dir or "."
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")
        if config.predictions.output is None:
            config.predictions.output = str(Path(root) / "predictions.parquet")
        self.resolve_ckpt_path(config, root)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The model is sized from the data module (the links above); a data module without
        # these attributes would leave the model at its defaults and fail at the first batch.
        missing = [a for a in ("image_size", "n_ehr_features") if not hasattr(self.datamodule, a)]
        if missing:
            raise SystemExit(
                f"error: data module {type(self.datamodule).__name__} has no {missing}: the CLI "
                "sizes the model from data.image_size and data.n_ehr_features; give the data "
                "module these attributes (jepa_lightning/data_contract.py)"
            )

    def resolve_ckpt_path(self, config, root: str) -> None:
        """``--ckpt_path last`` -> the newest *complete* checkpoint among ``last.ckpt``, the
        kept ones and SLURM's ``hpc_ckpt_<n>.ckpt`` (a truncated newer file is skipped with a
        warning naming it); an explicit path is checked so a truncated file is named in the
        error (checked in parse_arguments). Checkpoints are loaded with ``weights_only=True`` unless the user says otherwise."""
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True
        ckpt = config.get("ckpt_path")
        if ckpt == "best" and self.subcommand in ("validate", "test", "predict"):
            folder = Path(str(config.checkpoint.dirpath))
            kept = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            raise SystemExit(
                f"error: --ckpt_path best names the best checkpoint of a fit in the same "
                f"process; a separate '{self.subcommand}' has none (and a run whose selection "
                f"fell back to last.ckpt has no best at all). Give a file: "
                f"{', '.join(str(folder / k) for k in kept) or f'none found in {folder}'}"
            )
        if not ckpt or ckpt in ("best", "hpc") or "://" in str(ckpt):
            return
        if ckpt == "last":
            if "://" in str(config.checkpoint.dirpath):
                return  # remote folder: Lightning's own "last" lookup
            found = resolve_last(config.checkpoint.dirpath, root)
            config.ckpt_path = str(found) if found is not None else None
            if found is None:
                rank_zero_info(
                    f"--ckpt_path last: no checkpoint in {config.checkpoint.dirpath} yet, "
                    "starting fresh"
                )
            return

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config[self.subcommand] if self.subcommand else self.config
        timeout = config.get("ddp_timeout_s")
        if isinstance(trainer.strategy, DDPStrategy) and timeout:
            # Before the process group exists (it is created in trainer.fit/test/...): every
            # collective then fails after `timeout` instead of hanging a job whose ranks
            # disagree, which SIGTERM cannot interrupt while a rank is inside the collective.
            set_ddp_timeout(trainer.strategy, timedelta(seconds=float(timeout)))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # same-folder write + rename
        return trainer


def main(argv: list[str] | None = None) -> JEPALightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it, so tests can read
    ``cli.trainer.callback_metrics`` or call ``cli.trainer.test``."""
    return JEPALightningCLI(
        model_class=BaseTask,
        subclass_mode_model=True,
        # Any LightningDataModule whose batches follow jepa_lightning/data_contract.py; it
        # must have image_size and n_ehr_features, which the model is sized from.
        datamodule_class=LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=argv,
        parser_kwargs={"exit_on_error": False},
        save_config_kwargs={"overwrite": False},
        save_config_callback=SaveConfigToLoggers,
    )


def show_info_messages() -> None:
    """Print this package's INFO messages on stderr, as Lightning prints its own: what
    ``init_from`` loaded, the optimizer and EMA schedules, the reference probes. Python's
    default (no handler, WARNING) would hide them. Leaves a logging setup the user made alone."""
    logger = logging.getLogger("jepa_lightning")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def cli_main() -> None:
    """The console entry point (``python -m jepa_lightning``, ``jepa-lightning``): user
    errors (bad manifest, checkpoint mismatch, missing file) print one ``error:`` line and
    exit 1 instead of a traceback; ``main`` raises them for tests and notebooks. INFO
    messages are shown (:func:`show_info_messages`)."""
    show_info_messages()
    run_reporting_user_errors(main)


if __name__ == "__main__":
    cli_main()
