"""DDP on CPU: 2 gloo processes launched by Lightning itself (``--trainer.strategy=ddp``, plain,
``find_unused_parameters=False``) from the real CLI in a subprocess.

Each rank records what it saw with :class:`tests.rank_recorder.RankRecorder`; the tests
compare ranks with each other and recompute the logged metrics from the ranks' shares. The
manifest is arranged so that rank 1 sees no labelled validation scan and each rank sees only
one of the two test cohorts: the metrics must still cover every rank's scans, once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from jepa_lightning.collapse import centred_rank, mean_feature_std, rankme
from tests.helpers import ROOT

PRETRAIN = ROOT / "experiments" / "quickstart" / "pretrain.yaml"
FINETUNE = ROOT / "experiments" / "quickstart" / "finetune.yaml"
HANG_GUARD_S = 1200  # a deadlocked collective must fail the test, not stall CI

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def run_cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m jepa_lightning ...`` in a fresh process (Lightning's DDP launcher re-runs
    this command line once per extra rank)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "jepa_lightning", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, f"CLI failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_manifest(tiny_cohort, tmp_path_factory) -> Path:
    """28 training scans (14 per rank), 6 validation scans of which only even positions are
    labelled (rank 1 gets none: UnrepeatedDistributedSampler deals position i to rank i % 2),
    and 12 test scans alternating external (rank 0) / internal (rank 1)."""
    df = pd.read_parquet(tiny_cohort / "manifest.parquet")
    df["image"] = [str(tiny_cohort / p) for p in df["image"]]
    train = df[df["split"] == "train"]
    val = df[df["split"] == "val"].sort_values("label", ascending=False)
    labelled, unlabelled = list(val.index[[0, -2, -1]]), list(val.index[1:-2])  # both classes
    val = val.loc[[i for pair in zip(labelled, unlabelled, strict=True) for i in pair]]
    val.loc[unlabelled, "label"] = float("nan")
    ext = df[(df["split"] == "test") & (df["cohort"] == "external")].index[:6]
    internal = df[(df["split"] == "test") & (df["cohort"] == "internal")].index[:6]
    test = df.loc[[i for pair in zip(ext, internal, strict=True) for i in pair]]
    out = pd.concat([train, val, test]).reset_index(drop=True)
    path = tmp_path_factory.mktemp("ddp_manifest") / "manifest.parquet"
    out.to_parquet(path)
    assert val["label"].iloc[0::2].notna().all() and val["label"].iloc[1::2].isna().all()
    assert set(val["label"].iloc[0::2]) == {0.0, 1.0}
    return path


def ddp_config(
    base: Path,
    manifest: Path,
    run: Path,
    devices: int = 2,
    name: str = "config",
    data: dict | None = None,
    **model,
) -> Path:
    cfg = yaml.safe_load(base.read_text())
    cfg["trainer"].update(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run),
        callbacks=[
            {"class_path": "tests.rank_recorder.RankRecorder", "init_args": {"out_dir": str(run)}}
        ],
    )
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    cfg["model"]["init_args"].update(backbone={"depth": 2}, **model)
    cfg["data"] = {
        "class_path": "CTEHRDataModule",
        "init_args": {
            "manifest": str(manifest),
            "image_size": 32,
            "batch_size": 7,
            "num_workers": 0,
            "drop_last": False,
            "require_labels": cfg["data"]["init_args"].get("require_labels", False),
            **(data or {}),
        },
    }
    cfg["checkpoint"].pop("monitor", None)
    cfg["checkpoint"].pop("mode", None)
    path = run / f"{name}.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_ranks(run: Path, stage: str) -> list[dict]:
    ranks = [torch.load(run / f"{stage}_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.fixture(scope="module")
def jepa_ddp(ddp_manifest, tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("jepa_ddp")
    # heavy modality drop: most steps leave the image or the EHR tokenizer without gradient
    config = ddp_config(PRETRAIN, ddp_manifest, run, p_image_only=0.35, p_ehr_only=0.35)
    run_cli("fit", "--config", str(config))
    return load_ranks(run, "fit")


def test_ranks_see_disjoint_samples_covering_the_epoch(jepa_ddp, ddp_manifest):
    train = set(pd.read_parquet(ddp_manifest).query("split == 'train'")["scan_id"])
    for epoch in (0, 1):
        a, b = (set(r["train_scans"][epoch]) for r in jepa_ddp)
        assert len(a) == len(b) == len(train) // 2
        assert not a & b and a | b == train
    # reshuffled between epochs (Lightning calls sampler.set_epoch)
    assert jepa_ddp[0]["train_scans"][0] != jepa_ddp[0]["train_scans"][1]


def test_parameters_and_ema_target_identical_across_ranks(jepa_ddp):
    a, b = (r["state_dict"] for r in jepa_ddp)
    assert a.keys() == b.keys()
    assert any(k.startswith("target_encoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert jepa_ddp[0]["global_step"] == jepa_ddp[1]["global_step"] == 4


def test_modality_drop_ran_under_plain_ddp(jepa_ddp):
    modes = {m["jepa_mode"] for r in jepa_ddp for m in r["masks"]}
    assert modes - {"joint"}, "no step dropped a modality: the unused-parameter path was not run"


def test_masks_differ_across_ranks(jepa_ddp):
    for m0, m1 in zip(jepa_ddp[0]["masks"], jepa_ddp[1]["masks"], strict=True):
        same_shape = m0["tgt_image_idx"].shape == m1["tgt_image_idx"].shape
        assert not (same_shape and torch.equal(m0["tgt_image_idx"], m1["tgt_image_idx"]))


def test_validation_metrics_cover_every_rank_once(jepa_ddp, ddp_manifest):
    n_val = int((pd.read_parquet(ddp_manifest)["split"] == "val").sum())
    last = [r["val"][-1] for r in jepa_ddp]
    assert last[0]["epoch"] == last[1]["epoch"] == 1
    z = torch.cat([t for rec in last for t in rec["embeddings"]]).reshape(-1, 96)
    assert len(z) == n_val  # every scan once: no padding duplicates, not only rank 0's share
    logged = [rec["metrics"] for rec in last]
    assert logged[0] == logged[1]  # every rank logs the same, gathered value
    assert logged[0]["val/rankme"] == pytest.approx(rankme(z), rel=1e-4)
    assert logged[0]["val/centred_rank"] == pytest.approx(centred_rank(z), rel=1e-4)
    assert logged[0]["val/feature_std"] == pytest.approx(mean_feature_std(z), rel=1e-4)
    # rank 1 had no labelled scan, yet took part; the AUROC is over rank 0's three
    assert sum(t.numel() for t in last[1]["probe_preds"]) == 0
    preds = torch.cat(last[0]["probe_preds"])
    target = torch.cat(last[0]["probe_target"])
    assert len(preds) == 3
    assert logged[0]["val/probe_auroc"] == pytest.approx(float(binary_auroc(preds, target.long())))


@pytest.fixture(scope="module")
def jepa_ddp_streaming(ddp_manifest, tmp_path_factory) -> list[dict]:
    """The same pretraining with ``streaming: true``: 2 ranks x 2 loader workers each read
    their own share of a per-epoch permutation (28 training scans = 2 x 2 x batch 7, so
    ``drop_last`` keeps every scan)."""
    run = tmp_path_factory.mktemp("jepa_ddp_streaming")
    streaming = {"streaming": True, "drop_last": True, "num_workers": 2}
    run_cli("fit", "--config", str(ddp_config(PRETRAIN, ddp_manifest, run, data=streaming)))
    return load_ranks(run, "fit")


def test_streaming_under_ddp_reads_each_scan_once_per_epoch_and_ranks_stay_in_step(
    jepa_ddp_streaming, ddp_manifest
):
    df = pd.read_parquet(ddp_manifest)
    train = set(df.query("split == 'train'")["scan_id"])
    for epoch in (0, 1):
        a, b = (r["train_scans"][epoch] for r in jepa_ddp_streaming)
        assert len(a) == len(b) == len(train) // 2
        assert len(set(a)) == len(a) and not set(a) & set(b) and set(a) | set(b) == train
    assert jepa_ddp_streaming[0]["train_scans"][0] != jepa_ddp_streaming[0]["train_scans"][1]
    first, second = (r["state_dict"] for r in jepa_ddp_streaming)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert jepa_ddp_streaming[0]["global_step"] == jepa_ddp_streaming[1]["global_step"] == 4
    # validation streams without drop_last: every scan once over ranks and workers
    last = [r["val"][-1] for r in jepa_ddp_streaming]
    z = torch.cat([t for rec in last for t in rec["embeddings"]]).reshape(-1, 96)
    assert len(z) == int((df["split"] == "val").sum())


def test_diagnosis_ddp_fit_and_test_metrics_match_one_process(ddp_manifest, tmp_path):
    # image only: the EHR tokenizer never gets a gradient; plain ddp must still work
    config = ddp_config(FINETUNE, ddp_manifest, tmp_path, modalities="image", init_from=None)
    run_cli("fit", "--config", str(config), "--trainer.max_epochs=1")
    fit = load_ranks(tmp_path, "fit")
    for key in fit[0]["state_dict"]:
        assert torch.equal(fit[0]["state_dict"][key], fit[1]["state_dict"][key]), key
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in fit]
    assert "val/auroc" in val[0] and val[0] == val[1]  # train/loss is rank-local by design

    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    run_cli("test", "--config", str(config), f"--ckpt_path={ckpt}")
    ranks = load_ranks(tmp_path, "test")
    cohorts = [{c for _, c in r["test_scans"]} for r in ranks]
    assert cohorts == [{"external"}, {"internal"}]  # each rank misses one cohort
    seen = [s for r in ranks for s, _ in r["test_scans"]]
    assert len(seen) == len(set(seen)) == 12  # no scan twice

    single = tmp_path / "single"
    one_config = ddp_config(FINETUNE, ddp_manifest, single, devices=1, modalities="image")
    run_cli("test", "--config", str(one_config), f"--ckpt_path={ckpt}")
    one = torch.load(single / "test_rank0.pt", weights_only=False)["metrics"]
    for cohort in ("internal", "external"):
        assert ranks[0]["metrics"][f"test/{cohort}/n_scans"] == 6
        for name in ("auroc", "auprc", "n_scans"):
            key = f"test/{cohort}/{name}"
            assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]
            assert ranks[0]["metrics"][key] == pytest.approx(one[key], abs=1e-6), key


def test_a_rank_with_an_unreadable_batch_still_steps(ddp_manifest, tmp_path):
    """``on_bad_sample: skip`` with batch 1: whenever a rank draws an unreadable scan its whole
    batch is empty. Lightning refuses a skipped ``training_step`` under DDP, so that rank
    steps with an empty batch (``BaseTask.empty_batch``) and the fit completes."""
    df = pd.read_parquet(ddp_manifest)
    train = df.index[df["split"] == "train"][:16]
    for i in train:  # 16 of the training scans are not NIfTI files at all
        bad = tmp_path / f"unreadable_{i}.nii.gz"
        bad.write_bytes(b"this is not a NIfTI file")
        df.loc[i, "image"] = str(bad)
    manifest = tmp_path / "manifest.parquet"
    df.to_parquet(manifest)
    data = {"batch_size": 1, "cache_volumes": False, "on_bad_sample": "skip"}
    config = ddp_config(PRETRAIN, manifest, tmp_path / "run", data=data, reference_metrics=False)
    proc = run_cli("fit", "--config", str(config), "--trainer.max_epochs=1")
    assert "steps with an empty batch" in proc.stderr
    assert (tmp_path / "run").exists()
