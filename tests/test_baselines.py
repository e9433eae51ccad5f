"""Baselines through the real CLI on the tiny cohort: every method config pretrains, and
its checkpoint initialises DiagnosisTask for a linear probe and a finetune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from jepa_lightning.main import main
from jepa_lightning.schedules import ema_momentum
from jepa_lightning.tasks import MSN, DiagnosisTask
from jepa_lightning.tasks.diagnosis import CheckpointMismatchError
from tests.conftest import tiny_data_args
from tests.helpers import QUIET

METHODS = Path(__file__).resolve().parents[1] / "experiments" / "methods"
# A small backbone keeps every run to a few seconds; probe/finetune use the same sizes.
SMALL = ["--model.init_args.backbone.embed_dim=48", "--model.init_args.backbone.depth=2"]
# method config -> (encoder the probe loads by default, probe modalities)
PRETRAIN = {
    "jepa": ("target_encoder", "image+ehr"),
    "ijepa": ("target_encoder", "image"),
    "mae": ("encoder", "image"),
    "msn": ("target_encoder", "image"),
    "msn_ehr": ("target_encoder", "image"),
    "clip": ("encoder", "image+ehr"),
    "jepa_contrastive": ("target_encoder", "image+ehr"),
}


def _fit(name: str, run_dir: Path, cohort: Path, *extra: str):
    return main(
        [
            "fit", "--config", str(METHODS / f"{name}.yaml"),
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            *tiny_data_args(cohort), *QUIET, *SMALL, *extra,
        ]
    )  # fmt: skip


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def checkpoints(tiny_cohort, tmp_path_factory) -> dict[str, Path]:
    """Two optimizer steps and one validation batch of every pretraining method."""
    out = {}
    for name in PRETRAIN:
        run = tmp_path_factory.mktemp(name)
        cli = _fit(
            name, run, tiny_cohort, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.check_val_every_n_epoch=1",
        )  # fmt: skip
        metrics = cli.trainer.callback_metrics
        assert cli.trainer.global_step == 2, name
        for key in ("train/loss", "val/loss", "val/rankme", "val/feature_std"):
            assert key in metrics and torch.isfinite(metrics[key]), (name, key)
        out[name] = run / "checkpoints" / "last.ckpt"
        assert out[name].exists()
    return out


def test_every_method_config_resolves(capsys):
    names = sorted(p.stem for p in METHODS.glob("*.yaml"))
    assert set(PRETRAIN) | {
        "supervised_image", "supervised_ehr", "supervised_multimodal", "linear_probe", "finetune",
        "longitudinal_finetune",
    } == set(names)  # fmt: skip
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(METHODS / f"{name}.yaml"), "--print_config"])
        assert exit_.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["checkpoint"]["save_last"] is True
        assert printed["trainer"]["default_root_dir"] == f"runs/methods/{name}"


def test_ema_methods_keep_a_distinct_target_encoder(checkpoints):
    """After two steps the online encoder has moved away from its EMA target (both start
    equal), so 'target' and 'context' are different encoders to probe."""
    for name in ("jepa", "ijepa", "msn", "msn_ehr"):
        sd = _state(checkpoints[name])
        blocks = [k for k in sd if k.startswith("encoder.vit.blocks")]
        assert any(not torch.equal(sd[k], sd[f"target_{k}"]) for k in blocks), name
    assert "ehr_embed.identity" in _state(checkpoints["msn_ehr"])
    assert not any(k.startswith("ehr_embed") for k in _state(checkpoints["msn"]))


@pytest.mark.parametrize("method", list(PRETRAIN))
def test_linear_probe_from_each_method_keeps_the_backbone_frozen(
    method, checkpoints, tiny_cohort, tmp_path
):
    ckpt = checkpoints[method]
    prefix, modalities = PRETRAIN[method]
    cli = _fit(
        "linear_probe", tmp_path, tiny_cohort, f"--model.init_args.init_from={ckpt}",
        f"--model.init_args.modalities={modalities}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    sd = _state(ckpt)
    for name, value in cli.model.encoder.state_dict().items():
        assert torch.equal(value, sd[f"{prefix}.{name}"]), (method, name)
    assert not cli.model.encoder.training
    fresh_head = DiagnosisTask(backbone={"embed_dim": 48, "depth": 2}, n_ehr_features=12).head
    assert cli.model.head[-1].weight.shape == fresh_head[-1].weight.shape
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    for cohort in ("internal", "external"):
        assert 0.0 <= metrics[f"test/{cohort}/auroc"] <= 1.0


@pytest.mark.parametrize("method", list(PRETRAIN))
def test_finetune_from_each_method_trains_the_backbone(method, checkpoints, tiny_cohort, tmp_path):
    ckpt = checkpoints[method]
    prefix, modalities = PRETRAIN[method]
    cli = _fit(
        "finetune", tmp_path, tiny_cohort, f"--model.init_args.init_from={ckpt}",
        f"--model.init_args.modalities={modalities}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
    )  # fmt: skip
    assert cli.model._initialised_from == str(ckpt)
    sd = _state(ckpt)
    blocks = {k: v for k, v in cli.model.encoder.state_dict().items() if k.startswith("vit.blocks")}
    assert any(not torch.equal(v, sd[f"{prefix}.{k}"]) for k, v in blocks.items())
    # ... but started from the checkpoint: a weight the image path never touches is intact
    if modalities == "image":
        name = "ehr.missing_embed"
        assert torch.equal(cli.model.encoder.state_dict()[name], sd[f"{prefix}.{name}"])


def test_init_from_encoder_picks_the_ema_target_or_the_context_encoder(
    checkpoints, tiny_cohort, tmp_path
):
    ckpt = checkpoints["msn"]
    sd = _state(ckpt)
    for choice, prefix in (("target", "target_encoder"), ("context", "encoder")):
        cli = _fit(
            "linear_probe", tmp_path / choice, tiny_cohort, f"--model.init_args.init_from={ckpt}",
            f"--model.init_args.init_from_encoder={choice}", "--trainer.max_epochs=0",
        )  # fmt: skip
        for name, value in cli.model.encoder.state_dict().items():
            assert torch.equal(value, sd[f"{prefix}.{name}"]), (choice, name)


def test_target_encoder_requested_from_a_method_without_one(checkpoints, tiny_cohort, tmp_path):
    ckpt = checkpoints["mae"]
    with pytest.raises(CheckpointMismatchError, match=rf"{ckpt}.*no EMA target encoder.*context"):
        _fit("linear_probe", tmp_path, tiny_cohort, f"--model.init_args.init_from={ckpt}",
             "--model.init_args.init_from_encoder=target", "--trainer.max_epochs=0")  # fmt: skip


def test_checkpoint_that_does_not_fit_names_file_and_missing_keys(
    checkpoints, tiny_cohort, tmp_path
):
    ckpt = torch.load(checkpoints["clip"], map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["encoder.ehr.identity"]
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(CheckpointMismatchError, match=r"broken\.ckpt.*missing \['ehr\.identity'\]"):
        _fit("finetune", tmp_path, tiny_cohort, f"--model.init_args.init_from={broken}",
             "--trainer.max_epochs=0")  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=r"depth.*--model.init_args.backbone.depth=2"):
        _fit("finetune", tmp_path, tiny_cohort, f"--model.init_args.init_from={checkpoints['mae']}",
             "--model.init_args.backbone.depth=3", "--trainer.max_epochs=0")  # fmt: skip


@pytest.mark.parametrize(
    "name, modalities",
    [
        ("supervised_image", "image"),
        ("supervised_ehr", "ehr"),
        ("supervised_multimodal", "image+ehr"),
    ],
)
def test_supervised_baselines_train_from_scratch(name, modalities, tiny_cohort, tmp_path):
    cli = _fit(name, tmp_path, tiny_cohort, "--trainer.fast_dev_run=true")
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.modalities == modalities and cli.model.hparams.init_from is None


def _batch(n: int = 4, n_ehr: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 1, 32, 32, 32, generator=g),
        "ehr": torch.randn(n, n_ehr, generator=g),
        "ehr_missing": torch.zeros(n, n_ehr, dtype=torch.bool),
        "label": torch.tensor([0.0, 1.0, float("nan"), 1.0])[:n],
    }


def test_msn_ehr_fuses_ehr_into_the_anchor_branch_only():
    model = MSN(n_ehr_features=12, backbone={"embed_dim": 48, "depth": 1}, use_ehr=True)
    batch = _batch()
    other = dict(batch, ehr=batch["ehr"] + 1.0)
    torch.manual_seed(0)
    anchors = model.anchor_embeddings(batch)
    torch.manual_seed(0)
    anchors_other = model.anchor_embeddings(other)
    assert anchors.shape == (4 * 4, 48)  # 2 random + 2 focal views, view-major
    assert not torch.allclose(anchors, anchors_other)
    torch.manual_seed(0)
    out = model.ssl_losses(batch)
    torch.manual_seed(0)
    out_other = model.ssl_losses(other)
    assert torch.equal(out["pooled"], out_other["pooled"])  # target branch is image-only
    out["loss"].backward()
    assert model.ehr_embed.value_weight.grad is not None and model.fuse.weight.grad is not None
    assert model.target_encoder.vit.blocks[0].attn.qkv.weight.grad is None
    assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0


# --------------------------------------------------------------------------- label regimes


def test_label_fraction_keeps_whole_patients_in_the_training_split(tiny_cohort):
    from data_modules.synthetic import SyntheticCohortDataModule
    from tests.conftest import TINY

    def train_rows(**kw):
        dm = SyntheticCohortDataModule(root=str(tiny_cohort), **TINY, require_labels=True, **kw)
        dm.setup("fit")
        return dm.dataset("train").table, dm.dataset("val").table

    full, val_full = train_rows()
    part, val_part = train_rows(label_fraction=0.25, label_subset_seed=1)
    n_full = full["patient_id"].nunique()
    # stratified by class: round(0.25 * n) of each class, at least one of each
    assert abs(part["patient_id"].nunique() - 0.25 * n_full) <= 1.5
    assert set(part["scan_id"]) <= set(full["scan_id"]) and part["label"].notna().all()
    assert val_part["scan_id"].tolist() == val_full["scan_id"].tolist()  # evaluation untouched


def test_msn_ema_updates_once_per_optimizer_step_with_accumulation(
    tiny_cohort, tmp_path, monkeypatch
):
    from jepa_lightning.tasks import momentum

    calls = []
    real = momentum.ema_update_
    monkeypatch.setattr(momentum, "ema_update_", lambda t, o, m: (calls.append(m), real(t, o, m)))
    cli = _fit("msn", tmp_path, tiny_cohort, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
               "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0")  # fmt: skip
    assert cli.trainer.global_step == 2
    assert len(calls) == 2 * 2  # encoder and projector, once per optimizer step
    assert calls[0] == calls[1] < calls[2] == calls[3] <= 1.0
    # the update after optimizer step k uses the schedule at k (I-JEPA's), so the first is the
    # start momentum and the last is not a no-op (reading global_step after it moved was)
    start, end = cli.model.ema_start(), cli.model.ema_momentum_end
    assert calls[0] == pytest.approx(ema_momentum(0, 2, start, end))
    assert calls[2] == pytest.approx(ema_momentum(1, 2, start, end))
    assert calls[2] < 1.0
    share = float(cli.model.ema_init_share)
    assert share == pytest.approx(ema_momentum(0, 2, start, end) * ema_momentum(1, 2, start, end))


def test_mae_encoder_sees_only_the_visible_patches_and_loss_only_the_hidden():
    from jepa_lightning.tasks import MAE

    model = MAE(n_ehr_features=12, backbone={"embed_dim": 48, "depth": 1}, mask_ratio=0.75)
    seen = []
    model.encoder.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    batch = _batch()
    torch.manual_seed(0)
    out = model.ssl_losses(batch)
    assert seen[0] == (4, 16, 48)  # 25 % of the 64 patches go through the encoder
    assert seen[1] == (4, 64, 48)  # the probe's features: the whole volume, no gradient
    out["loss"].backward()
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert model.encoder.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.encoder.ehr.identity.grad is None  # image-only: EHR path frozen
