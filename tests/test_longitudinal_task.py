"""The time-aware finetuning task on hand-built sequence batches (the data module's sequence
contract: ``[B, S, ...]`` left-padded, the latest scan at ``S - 1``): what reaches the
encoder, what the output depends on, the time code, the cross-sectional switch, gradients,
``init_from`` a single-scan checkpoint, and a Lightning fit / test / predict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from jepa_lightning.backbones import TemporalEncoder, TimeEmbedding
from jepa_lightning.tasks import DiagnosisTask, LongitudinalDiagnosisTask, MultimodalJEPA
from tests.helpers import QUIET
from tests.test_distributed import run_cli

IMAGE, F, C = 16, 4, 32
TINY = {"embed_dim": C, "depth": 1, "num_heads": 2}
N_REAL = (1, 3, 4)  # real scans of each patient of the batch (S = 4)


def sequence_batch(n_real=N_REAL, s: int = 4, seed: int = 0, cohorts=None) -> dict:
    """A batch as CTEHRDataModule(sequence=true) collates it: left-padded, zeros (and
    ``ehr_missing`` True) at padding, times in days relative to the latest scan."""
    g = torch.Generator().manual_seed(seed)
    b = len(n_real)
    mask = torch.zeros(b, s, dtype=torch.bool)
    times = torch.zeros(b, s)
    for i, n in enumerate(n_real):
        mask[i, s - n :] = True
        gaps = 90 + 450 * torch.rand(n - 1, generator=g)  # 3 months to 1.5 years
        times[i, s - n : s - 1] = -gaps.flip(0).cumsum(0).flip(0)
    image = (
        torch.randn(b, s, 1, IMAGE, IMAGE, IMAGE, generator=g) * mask[..., None, None, None, None]
    )
    ehr = torch.randn(b, s, F, generator=g) * mask[..., None]
    missing = (torch.rand(b, s, F, generator=g) < 0.2) | ~mask[..., None]
    return {
        "image": image,
        "ehr": ehr,
        "ehr_missing": missing,
        "scan_mask": mask,
        "scan_times": times,
        "label": torch.tensor([float(i % 2) for i in range(b)]),
        "patient_id": [f"p{i}" for i in range(b)],
        "scan_id": [f"p{i}-s{n - 1}" for i, n in enumerate(n_real)],
        "cohort": list(cohorts) if cohorts else ["internal"] * b,
    }


def task(**kwargs) -> LongitudinalDiagnosisTask:
    torch.manual_seed(0)
    kwargs = {"image_size": IMAGE, "n_ehr_features": F, "backbone": TINY, **kwargs}
    return LongitudinalDiagnosisTask(**kwargs).eval()


def sharpen(model: LongitudinalDiagnosisTask) -> LongitudinalDiagnosisTask:
    """Larger temporal weights than the init's (std 0.02 leaves every residual branch near
    zero, so history moves a fresh model's logit by ~1e-5): dependence tests then measure
    the structure, not float noise."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*model.temporal.parameters(), *model.time_embed.parameters()]:
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def clone(batch: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else list(v) for k, v in batch.items()}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(batch)


def test_one_logit_per_patient_and_the_latest_tokens_feature():
    model, batch = task(), sequence_batch()
    out = logits(model, batch)
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert model.features(batch).shape == (3, C)


def test_only_real_scans_reach_the_encoder_and_padding_changes_nothing():
    model, batch = sharpen(task()), sequence_batch()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    ref = logits(model, batch)
    assert seen == [sum(N_REAL)]  # one pass over the 8 real scans, none of the 4 padded
    noisy = clone(batch)
    pad = ~batch["scan_mask"]
    noisy["image"][pad] = torch.randn_like(noisy["image"][pad]) * 100
    noisy["ehr"][pad] = 7.0
    noisy["ehr_missing"][pad] = False
    noisy["scan_times"][pad] = -12345.0
    assert torch.equal(logits(model, noisy), ref)


@pytest.mark.parametrize("modalities", ["image", "ehr", "image+ehr"])
def test_the_earlier_scans_and_their_times_matter(modalities):
    model, batch = sharpen(task(modalities=modalities)), sequence_batch()
    ref = logits(model, batch)
    swapped = clone(batch)  # patient 2: scans 1 and 2 change places, their times stay
    for key in ("image", "ehr", "ehr_missing"):
        swapped[key][2, [1, 2]] = batch[key][2, [2, 1]]
    out = logits(model, swapped)
    assert (out[2] - ref[2]).abs() > 1e-3 and torch.equal(out[:2], ref[:2])
    retimed = clone(batch)
    retimed["scan_times"][1, 2] -= 300.0
    out = logits(model, retimed)
    assert (out[1] - ref[1]).abs() > 1e-3 and torch.equal(out[[0, 2]], ref[[0, 2]])
    dropped = clone(batch)  # patient 1 loses its earliest scan
    dropped["scan_mask"][1, 1] = False
    assert (logits(model, dropped)[1] - ref[1]).abs() > 1e-3


def test_time_embedding_tells_times_apart_and_zero_days_is_not_a_blank_code():
    emb = TimeEmbedding(C)
    days = torch.tensor([0.0, -1.0, -30.0, -365.0, -730.0, -3650.0, -36500.0, 1e6])
    feats = emb.features(days)
    assert feats.shape == (len(days), 10) and torch.isfinite(feats).all()
    assert feats[0].abs().sum() > 0 and emb(days[:1]).abs().sum() > 0  # cos(0) = 1
    codes = emb(days)
    assert torch.isfinite(codes).all() and codes.shape == (len(days), C)
    assert torch.cdist(codes[:6], codes[:6]).add(torch.eye(6)).min() > 0  # pairwise distinct
    assert torch.cdist(feats[:6], feats[:6]).add(torch.eye(6)).min() > 1e-3
    assert emb(torch.zeros(2, 3)).shape == (2, 3, C)  # any leading shape
    with pytest.raises(ValueError, match="positive periods"):
        TimeEmbedding(C, [365.0, 0.0])


def test_temporal_encoder_checks_its_inputs():
    enc = TemporalEncoder(C, depth=1, num_heads=4)
    x, mask = torch.randn(2, 3, C), torch.tensor([[False, True, True], [False, False, True]])
    assert enc(x, mask).shape == (2, C)
    with pytest.raises(ValueError, match="latest scan sits at S - 1"):
        enc(x, torch.tensor([[True, True, False], [False, False, True]]))
    with pytest.raises(ValueError, match="does not divide the backbone width"):
        TemporalEncoder(C, num_heads=5)


def test_history_false_reads_the_latest_scan_alone():
    model = sharpen(task(history=False))
    batch = sequence_batch()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    ref = logits(model, batch)
    assert seen == [3]  # one scan per patient is encoded
    other = clone(batch)
    earlier = batch["scan_mask"].clone()
    earlier[:, -1] = False
    other["image"][earlier] = torch.randn_like(other["image"][earlier])
    other["scan_times"][earlier] = -1.0
    other["scan_mask"][:, :-1] = True  # even a different history layout
    assert torch.equal(logits(model, other), ref)
    # the same weights with history read a history-free batch alike: the cross-sectional
    # model is the longitudinal one on max_scans-1 data
    longitudinal = task(history=True)
    longitudinal.load_state_dict(model.state_dict())
    latest_only = clone(batch)
    latest_only["scan_mask"][:, :-1] = False
    assert torch.allclose(logits(longitudinal, latest_only), ref, atol=1e-6)


def _grad_norm(module) -> float:
    grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).sum()) if grads else 0.0


def _loss_backward(model, batch) -> None:
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    loss.backward()


def test_gradients_reach_encoder_time_embedding_and_temporal_blocks():
    model = task(modalities="image")
    _loss_backward(model, sequence_batch())
    for part in (model.encoder.vit, model.time_embed, model.temporal, model.head):
        assert _grad_norm(part) > 0, part
    grouped = [id(p) for g in model.param_groups() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # every weight in one optimizer group


def test_a_frozen_backbone_stays_frozen_while_the_temporal_parts_train():
    model = task(freeze_backbone=True)
    _loss_backward(model, sequence_batch())
    assert not model.encoder.training and model.temporal.training
    assert all(p.grad is None for p in model.encoder.parameters())
    for part in (model.time_embed, model.temporal, model.head):
        assert _grad_norm(part) > 0, part
    grouped = {id(p) for g in model.param_groups() for p in g["params"]}
    assert not grouped & {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in model.temporal.parameters()} <= grouped


def test_a_single_scan_batch_is_refused_with_the_setting_to_change():
    batch = sequence_batch()
    single = {
        k: (v[:, -1] if k in ("image", "ehr", "ehr_missing") else v) for k, v in batch.items()
    }
    del single["scan_mask"], single["scan_times"]
    with pytest.raises(ValueError, match="sequence: true"):
        task()(single)


def test_init_from_a_single_scan_checkpoint_loads_the_encoder_exactly(tmp_path):
    torch.manual_seed(1)
    pre = MultimodalJEPA(image_size=IMAGE, n_ehr_features=F, backbone=TINY)
    with torch.no_grad():  # make the EMA target differ from the context encoder
        for p in pre.target_encoder.parameters():
            p.add_(0.01)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, path)
    model = task(init_from=str(path))
    fresh = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    model.initialise_from_checkpoint(str(path))
    target = pre.target_encoder.state_dict()
    loaded = model.encoder.state_dict()
    assert loaded.keys() == target.keys()
    assert all(torch.equal(loaded[k], target[k]) for k in target)  # EMA target (auto)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())  # temporal parts fresh
    # and a DiagnosisTask finetuned from it initialises the longitudinal task alike
    diag = DiagnosisTask(image_size=IMAGE, n_ehr_features=F, backbone=TINY)
    diag_path = tmp_path / "diag.ckpt"
    torch.save({"state_dict": diag.state_dict(), "hyper_parameters": dict(diag.hparams)}, diag_path)
    model.initialise_from_checkpoint(str(diag_path))
    assert all(
        torch.equal(model.encoder.state_dict()[k], v) for k, v in diag.encoder.state_dict().items()
    )


class SequenceBatches(L.LightningDataModule):
    """Hand-built sequence batches for every stage; two test cohorts."""

    cohorts = ["internal", "external"]

    def __init__(self):
        super().__init__()
        self.train = [sequence_batch(seed=i) for i in range(2)]
        self.val = [sequence_batch((4, 2, 1, 3), seed=10)]
        mixed = ["internal", "internal", "external", "external"]  # both classes in each
        self.test = [sequence_batch((2, 4, 1, 3), seed=20 + i, cohorts=mixed) for i in range(2)]

    def _loader(self, batches):
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    def train_dataloader(self):
        return self._loader(self.train)

    def val_dataloader(self):
        return self._loader(self.val)

    def test_dataloader(self):
        return self._loader(self.test)

    def predict_dataloader(self):
        return self._loader(self.test)


def test_fit_validate_test_and_predict_through_lightning(tmp_path):
    model, data = task(lr=1e-3).train(), SequenceBatches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    assert trainer.global_step == 2 and "val/auroc" in trainer.callback_metrics
    after = model.state_dict()
    for prefix in ("encoder.", "time_embed.", "temporal.", "head."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix))
    metrics = trainer.test(model, data, verbose=False)[0]
    for cohort in ("internal", "external"):
        assert metrics[f"test/{cohort}/n_scans"] == 4  # one sample per patient
        assert math.isfinite(metrics[f"test/{cohort}/auroc"])
    preds = trainer.predict(model, data)
    batch = data.test[0]
    assert preds[0]["scan_id"] == batch["scan_id"] and preds[0]["patient_id"] == batch["patient_id"]
    assert preds[0]["embedding"].shape == (4, C)
    assert torch.allclose(preds[0]["prob"], torch.sigmoid(logits(model.eval(), batch)), atol=1e-6)


# --- through the CLI, on a longitudinal synthetic cohort -----------------------------------

LONGITUDINAL = dict(n_patients=40, n_external=12, labeled_fraction=0.5, n_ehr_features=12,
                    scans_per_patient=(1, 4), growth_signal=1.0)  # fmt: skip
YAML = (
    Path(__file__).resolve().parents[1] / "experiments" / "methods" / "longitudinal_finetune.yaml"
)
SMALL = ["--model.init_args.backbone.embed_dim=32", "--model.init_args.backbone.depth=1",
         "--model.init_args.backbone.num_heads=2"]  # fmt: skip


@pytest.fixture(scope="module")
def longitudinal_cohort(tmp_path_factory) -> Path:
    """40 + 12 patients with 1-4 scans each (~130 scans); read-only."""
    from data_modules.synthetic import CohortSpec, generate_cohort

    root = tmp_path_factory.mktemp("longitudinal") / "cohort"
    generate_cohort(root, CohortSpec(**LONGITUDINAL), progress=False)
    return root


def longitudinal_data_args(root: Path) -> list[str]:
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in LONGITUDINAL.items()}
    return [f"--data.init_args.root={root}", "--data.init_args.image_size=16",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
            *(f"--data.init_args.{k}={json.dumps(v)}" for k, v in spec.items())]  # fmt: skip


def latest_scans_of(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.sort_values("scan_time").groupby("patient_id").tail(1)


def test_cli_fit_test_predict_from_a_single_scan_checkpoint(longitudinal_cohort, tmp_path):
    from jepa_lightning.main import main

    pre = MultimodalJEPA(image_size=16, n_ehr_features=12, backbone=TINY)
    init = tmp_path / "jepa.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, init)
    run = tmp_path / "run"
    common = ["--config", str(YAML), *longitudinal_data_args(longitudinal_cohort), *SMALL,
              *QUIET, f"--trainer.default_root_dir={run}",
              f"--trainer.logger.init_args.save_dir={run}"]  # fmt: skip
    cli = main(["fit", *common, f"--model.init_args.init_from={init}", "--trainer.max_epochs=1"])
    model = cli.model
    assert isinstance(model, LongitudinalDiagnosisTask) and model._initialised_from == str(init)
    assert cli.trainer.global_step >= 1 and "val/auroc" in cli.trainer.callback_metrics
    ckpt = run / "checkpoints" / "last.ckpt"

    manifest = pd.read_parquet(longitudinal_cohort / "manifest.parquet")
    assert manifest.groupby("patient_id").size().max() > 1  # a longitudinal cohort
    test = main(["test", *common, f"--ckpt_path={ckpt}"]).trainer.callback_metrics
    labelled = manifest[(manifest["split"] == "test") & manifest["label"].notna()]
    for cohort, n in labelled.groupby("cohort").size().items():
        assert test[f"test/{cohort}/n_scans"] == n  # one sample per labelled patient

    out = tmp_path / "predictions.parquet"
    main(["predict", *common, f"--ckpt_path={ckpt}", f"--predictions.output={out}"])
    preds = pd.read_parquet(out)
    latest = latest_scans_of(manifest[manifest["split"] == "test"])
    assert sorted(preds["scan_id"]) == sorted(latest["scan_id"])  # one row per patient
    assert preds.set_index("scan_id").loc[latest["scan_id"], "patient_id"].tolist() == (
        latest["patient_id"].tolist()
    )
    assert preds.filter(like="emb_").shape[1] == 32 and preds["prob"].between(0, 1).all()


def _ddp_config(manifest: Path, run: Path, devices: int) -> Path:
    cfg = yaml.safe_load(YAML.read_text())
    cfg["trainer"].update(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(run), deterministic=False,
        callbacks=[{"class_path": "tests.rank_recorder.RankRecorder",
                    "init_args": {"out_dir": str(run)}}],
    )  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    cfg["model"]["init_args"].update(backbone=TINY)
    cfg["data"] = {
        "class_path": "CTEHRDataModule",
        "init_args": {"manifest": str(manifest), "image_size": 16, "batch_size": 3,
                      "num_workers": 0, "drop_last": False, "require_labels": True,
                      "sequence": True, "max_scans": 4},
    }  # fmt: skip
    cfg["checkpoint"] = {"save_last": True}
    cfg["ddp_timeout_s"] = 120  # a regression fails in minutes, not after torch's 30
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.ddp
def test_sequence_task_under_two_process_ddp_matches_one_process(longitudinal_cohort, tmp_path):
    """2 gloo processes: patients (not scans) are dealt to ranks, the ranks stay in step,
    and the per-cohort test metrics over both ranks equal one process's."""
    df = pd.read_parquet(longitudinal_cohort / "manifest.parquet")
    df["image"] = [str(longitudinal_cohort / p) for p in df["image"]]
    manifest = tmp_path / "manifest.parquet"
    df.to_parquet(manifest)
    run = tmp_path / "ddp"
    config = _ddp_config(manifest, run, devices=2)
    run_cli("fit", "--config", str(config))
    fit = [torch.load(run / f"fit_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in fit] == [2, 2]
    for key in fit[0]["state_dict"]:
        assert torch.equal(fit[0]["state_dict"][key], fit[1]["state_dict"][key]), key
    seen = [set(r["train_scans"][0]) for r in fit]
    assert not seen[0] & seen[1]  # each patient on one rank
    labelled = df[(df["split"] == "train") & df["label"].notna()]
    assert len(labelled) % 2 == 0  # so the training sampler repeats no patient to even out
    assert seen[0] | seen[1] == set(labelled["scan_id"])  # every labelled patient's latest scan
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in fit]
    assert "val/auroc" in val[0] and val[0] == val[1]

    ckpt = str(run / "checkpoints" / "last.ckpt")
    run_cli("test", "--config", str(config), f"--ckpt_path={ckpt}")
    ranks = [torch.load(run / f"test_rank{r}.pt", weights_only=False) for r in (0, 1)]
    scans = [s for r in ranks for s, _ in r["test_scans"]]
    assert (
        len(scans) == len(set(scans)) == int(((df["split"] == "test") & df["label"].notna()).sum())
    )  # every labelled test patient once
    single = tmp_path / "single"
    run_cli(
        "test", "--config", str(_ddp_config(manifest, single, devices=1)), f"--ckpt_path={ckpt}"
    )
    one = torch.load(single / "test_rank0.pt", weights_only=False)["metrics"]
    for cohort in ("internal", "external"):
        for name in ("auroc", "auprc", "n_scans"):
            key = f"test/{cohort}/{name}"
            assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]
            assert ranks[0]["metrics"][key] == pytest.approx(one[key], abs=1e-6), key
