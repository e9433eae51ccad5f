"""The command line: ``python -m jepa_lightning {fit,validate,test,predict} --config a.yaml``.

A LightningCLI in subclass mode: ``model`` is any task (``MultimodalJEPA``,
``DiagnosisTask``, ...) and ``data`` any data module (``SyntheticCohortDataModule``,
``CTEHRDataModule``), by short class name. The data module's ``image_size`` and
``n_ehr_features`` are linked into the model, so they are set in one place.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so their classes resolve by short name in configs.
import data_modules.ct_ehr  # noqa: F401
import data_modules.synthetic  # noqa: F401
import jepa_lightning.tasks  # noqa: F401
from jepa_lightning import __version__
from jepa_lightning.callbacks import PredictionWriter
from jepa_lightning.tasks.base import BaseTask


class JEPALightningCLI(LightningCLI):
    """LightningCLI with our defaults: a ModelCheckpoint (``--checkpoint.*``, ``save_last``)
    writing to ``<default_root_dir>/checkpoints`` so a requeued job finds ``last.ckpt``,
    data -> model links, and ``--version``."""

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"jepa-lightning {__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
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
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or "."
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")
        if config.predictions.output is None:
            root = config.trainer.default_root_dir or "."
            config.predictions.output = str(Path(root) / "predictions.parquet")


def main(argv: list[str] | None = None) -> JEPALightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it, so tests can read
    ``cli.trainer.callback_metrics`` or call ``cli.trainer.test``."""
    return JEPALightningCLI(
        model_class=BaseTask,
        subclass_mode_model=True,
        datamodule_class=data_modules.ct_ehr.CTEHRDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=argv,
        save_config_kwargs={"overwrite": False},
    )


if __name__ == "__main__":
    main()
