"""Mixed precision: bf16-mixed runs on CPU; the encoders compute in bf16 under autocast while
the losses, the weights and the EMA target stay fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from jepa_lightning.backbones import multimodal_encoder
from jepa_lightning.main import main
from jepa_lightning.tasks import jepa as jepa_module
from tests.conftest import tiny_data_args

PRETRAIN = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "pretrain.yaml")


def test_bf16_mixed_pretraining_keeps_losses_and_ema_in_fp32(tiny_cohort, tmp_path, monkeypatch):
    dtypes: dict[str, set] = {"encoder": set(), "loss": set()}
    real_forward = multimodal_encoder.MultimodalEncoder.forward
    real_loss = jepa_module.latent_regression_loss

    def forward(self, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            dtypes["encoder"].add(torch.get_autocast_dtype("cpu"))
        return real_forward(self, *args, **kwargs)

    def loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        dtypes["loss"].add(out.dtype)
        return out

    monkeypatch.setattr(multimodal_encoder.MultimodalEncoder, "forward", forward)
    monkeypatch.setattr(jepa_module, "latent_regression_loss", loss)
    cli = main(["fit", "--config", PRETRAIN, *tiny_data_args(tiny_cohort),
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.precision=bf16-mixed", "--trainer.max_steps=3",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                "--model.init_args.backbone.depth=1", "--model.init_args.backbone.embed_dim=32",
                "--model.init_args.predictor_dim=16"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert dtypes["encoder"] == {torch.bfloat16}  # the encoders ran under bf16 autocast
    assert dtypes["loss"] == {torch.float32}
    model = cli.model  # weights and the EMA target (updated each step) stay fp32
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.target_encoder.parameters())
