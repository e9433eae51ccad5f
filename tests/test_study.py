"""predict -> Parquet, the study runner (micro grid, resume, bad YAML), the quickstart study
and encoder inspection, through the real CLI on the tiny generated cohort."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jepa_lightning.evaluation import inspect_encoder, runs, stats, study
from jepa_lightning.evaluation.study_spec import StudyConfigError, load_study
from jepa_lightning.main import main
from tests.conftest import tiny_data_args
from tests.helpers import QUIET

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "quickstart"
PRETRAIN, FINETUNE = str(CONFIGS / "pretrain.yaml"), str(CONFIGS / "finetune.yaml")


@pytest.fixture(scope="module")
def finetuned(tiny_cohort, tmp_path_factory) -> Path:
    """A DiagnosisTask trained for one epoch; returns its run folder."""
    run = tmp_path_factory.mktemp("finetune")
    main(
        ["fit", "--config", FINETUNE, f"--trainer.default_root_dir={run}",
         f"--trainer.logger.init_args.save_dir={run}", "--trainer.max_epochs=1",
         *tiny_data_args(tiny_cohort), *QUIET]
    )  # fmt: skip
    return run


def _predict(run: Path, cohort: Path, *extra: str):
    return main(
        ["predict", "--config", FINETUNE, f"--trainer.default_root_dir={run}",
         f"--trainer.logger.init_args.save_dir={run}", f"--ckpt_path={run}/checkpoints/last.ckpt",
         *tiny_data_args(cohort), *QUIET, *extra]
    )  # fmt: skip


def test_predict_writes_parquet_and_refuses_to_overwrite(finetuned, tiny_cohort, tmp_path):
    out = tmp_path / "preds.parquet"
    _predict(finetuned, tiny_cohort, f"--predictions.output={out}")
    table = pd.read_parquet(out)
    manifest = pd.read_parquet(tiny_cohort / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    assert sorted(table["scan_id"]) == sorted(test["scan_id"])  # every test scan, once
    assert list(table.columns[:5]) == ["scan_id", "patient_id", "cohort", "label", "prob"]
    emb = [c for c in table.columns if c.startswith("emb_")]
    assert emb == [f"emb_{i}" for i in range(96)]  # embed_dim of the quickstart config
    assert table["prob"].between(0, 1).all()
    merged = table.merge(test, on="scan_id", suffixes=("", "_m"))
    assert (merged["patient_id"] == merged["patient_id_m"]).all()
    assert (merged["cohort"] == merged["cohort_m"]).all()
    assert (merged["label"] == merged["label_m"]).all()
    assert set(table["cohort"]) == {"internal", "external"}
    before = out.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        _predict(finetuned, tiny_cohort, f"--predictions.output={out}")
    assert out.stat().st_mtime_ns == before
    _predict(finetuned, tiny_cohort, f"--predictions.output={out}", "--predictions.overwrite=true")
    assert len(pd.read_parquet(out)) == len(table)


def test_predict_defaults_to_the_run_folder(finetuned, tiny_cohort):
    _predict(finetuned, tiny_cohort)
    assert (finetuned / "predictions.parquet").exists()


# --- study runner ---------------------------------------------------------------------------
def _micro_study(cohort: Path, out: Path) -> dict:
    data = tiny_data_args(cohort)
    return {
        "name": "micro",
        "out": str(out),
        "common_args": [*data, *QUIET, "--trainer.max_epochs=1"],
        "label_fractions": [0.5],
        "subsets": [0],
        "reference": {"method": "supervised", "protocol": "scratch"},
        "comparisons": [
            {
                "model": {"method": "jepa", "protocol": "linear_probe"},
                "against": {"method": "supervised", "protocol": "scratch"},
            }
        ],
        "bootstrap": {"n_resamples": 50, "seed": 0},
        "protocols": {
            "linear_probe": {
                "configs": [FINETUNE],
                "args": ["--model.init_args.freeze_backbone=true"],
            },
            "scratch": {"configs": [FINETUNE], "pretrained": False},
        },
        "methods": {
            "jepa": {"pretrain": PRETRAIN, "protocols": ["linear_probe"]},
            "supervised": {"protocols": ["scratch"]},
        },
    }


@pytest.fixture(scope="module")
def micro_study(tiny_cohort, tmp_path_factory):
    """A 2-run study (JEPA linear probe vs supervised from scratch), run once per module."""
    tmp = tmp_path_factory.mktemp("micro")
    cfg, out = tmp / "micro.yaml", tmp / "study"
    cfg.write_text(yaml.safe_dump(_micro_study(tiny_cohort, out)))
    listing = runs.run_status(load_study(cfg))
    table = study.main(["--config", str(cfg)])
    return cfg, out, table, listing


def test_dry_run_lists_runs_and_runs_nothing(tiny_cohort, tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(_micro_study(tiny_cohort, tmp_path / "study")))
    assert study.main(["--config", str(cfg), "--dry-run"]) is None
    log = capsys.readouterr().out
    assert "todo  pretrain jepa" in log and "todo  supervised__scratch__f0.5__s0" in log
    assert "2 runs: 0 done, 2 to run" in log
    assert not (tmp_path / "study").exists()


def test_methods_option_runs_only_those_and_the_reference(tiny_cohort, tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    spec = _micro_study(tiny_cohort, tmp_path / "study")
    spec["reference"] = {"method": "supervised", "protocol": "scratch"}
    cfg.write_text(yaml.safe_dump(spec))
    assert study.main(["--config", str(cfg), "--dry-run", "--methods", "jepa"]) is None
    log = capsys.readouterr().out
    assert "jepa__linear_probe" in log and "supervised__scratch" in log  # the reference stays
    spec["reference"] = None
    cfg.write_text(yaml.safe_dump(spec))
    assert study.main(["--config", str(cfg), "--dry-run", "--methods", "supervised"]) is None
    log = capsys.readouterr().out
    assert "jepa" not in log and "1 runs: 0 done" in log
    with pytest.raises(ValueError, match="no method"):
        study.main(["--config", str(cfg), "--dry-run", "--methods", "nope"])


def test_study_micro_grid_writes_table_and_plots_then_resumes(micro_study, tiny_cohort, capsys):
    cfg, out, table, listing = micro_study
    assert [r.run_id for r, done in listing] == [
        "jepa__linear_probe__f0.5__s0", "supervised__scratch__f0.5__s0",
    ]  # fmt: skip
    for name in ("results.csv", "results.md", "roc_internal.png", "roc_external.png", "tsne.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(table["cohort"]) == {"internal", "external"}
    assert set(table["method"]) == {"jepa", "supervised"}
    for col in ("auroc_mean", "auroc_ci_low", "auroc_ci_high", "auprc_mean"):
        assert table[col].between(0, 1).all(), col
    assert (table["auroc_ci_low"] <= table["auroc_ci_high"]).all()
    ref = table["method"] == "supervised"
    assert table.loc[ref, "auroc_p_vs_ref"].isna().all()
    assert table.loc[~ref, "auroc_p_vs_ref"].between(0, 1).all()
    md = (out / "results.md").read_text()
    assert "| jepa | linear_probe | 50 % | external |" in md and "ref" in md
    pretrained = runs.read_marker(out / "pretrain" / "jepa")
    assert Path(pretrained["checkpoint"]).exists()
    # comparisons: the pair's difference on the same scans, the same test as the table's p
    pairs = pd.read_csv(out / "comparisons.csv")
    assert len(pairs) == 2 * 2  # 2 cohorts x (AUROC, AUPRC)
    for r in pairs.itertuples():
        rows = table[table["cohort"] == r.cohort].set_index("method")
        assert r.delta == pytest.approx(
            rows.loc["jepa", f"{r.metric}_mean"] - rows.loc["supervised", f"{r.metric}_mean"]
        )
        assert r.p_value == pytest.approx(rows.loc["jepa", f"{r.metric}_p_vs_ref"])
        assert r.delta_low <= r.delta_high and r.verdict in {"helped", "tied", "hurt"}
    assert "## Comparisons" in md and "| jepa / linear_probe | supervised / scratch |" in md
    # The probe started from the pretraining checkpoint the marker names.
    marker = runs.read_marker(out / "runs" / "jepa__linear_probe__f0.5__s0")
    assert f"--model.init_args.init_from={pretrained['checkpoint']}" in marker["argv"]
    # The table is the statistics module's numbers on the saved predictions, nothing else.
    preds = pd.read_parquet(marker["predictions"])
    internal = preds[preds["cohort"] == "internal"]
    direct = stats.bootstrap_summary(internal, "auroc", n_resamples=50, seed=0)
    row = table[(table["method"] == "jepa") & (table["cohort"] == "internal")].iloc[0]
    assert (row.auroc_mean, row.auroc_ci_low, row.auroc_ci_high) == pytest.approx(
        (direct["point"], direct["low"], direct["high"])
    )

    capsys.readouterr()
    again = study.main(["--config", str(cfg)])
    log = capsys.readouterr().out
    assert "2 already done, 0 to run" in log and "running" not in log
    pd.testing.assert_frame_equal(again, table)

    # Finished runs never pretrain again, even when the pretraining's marker is gone.
    (out / "pretrain" / "jepa" / "done.json").unlink()
    study.main(["--config", str(cfg)])
    log = capsys.readouterr().out
    assert "2 already done, 0 to run" in log and "pretraining" not in log

    # A run whose folder lacks the marker (interrupted) is run again, alone.
    (out / "runs" / "supervised__scratch__f0.5__s0" / "done.json").unlink()
    study.main(["--config", str(cfg)])
    log = capsys.readouterr().out
    assert "1 already done, 1 to run" in log and "removing the interrupted run" in log

    # Changing a run's arguments under the same out folder is refused, not mixed in.
    changed = _micro_study(tiny_cohort, out)
    changed["protocols"]["scratch"]["args"] = ["--model.init_args.lr=1e-2"]
    cfg.write_text(yaml.safe_dump(changed))
    with pytest.raises(runs.StudyStateError, match="other arguments"):
        study.main(["--config", str(cfg)])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(label_fraction=[0.1]), "unknown key label_fraction"),
        (lambda d: d["methods"]["jepa"].update(protcols=["x"]), "methods.jepa.protcols"),
        (lambda d: d["methods"]["jepa"].update(protocols=["nope"]), "methods.jepa.protocols names 'nope'"),
        (lambda d: d["methods"]["supervised"].update(protocols=["linear_probe"]), "methods.supervised.pretrain is not set"),
        (lambda d: d["methods"]["jepa"].update(pretrain="missing.yaml"), "methods.jepa.pretrain names missing.yaml"),
        (lambda d: d.update(label_fractions=[0.0]), "label_fractions"),
        (lambda d: d.update(reference={"method": "x", "protocol": "scratch"}), "reference x/scratch"),
        (lambda d: d["bootstrap"].update(n_resamples=0), "bootstrap.n_resamples"),
        (lambda d: d["comparisons"][0]["against"].update(protocol="finetune"), "comparisons[0].against supervised/finetune"),
        (lambda d: d["comparisons"][0].pop("model"), "comparisons[0] must be a mapping with model and against"),
        (lambda d: d.pop("protocols"), "missing required key protocols"),
        (lambda d: d["methods"]["jepa"].update(pretrain_checkpoint="first"), "methods.jepa.pretrain_checkpoint must be best or last"),
    ],
)  # fmt: skip
def test_bad_study_yaml_names_the_key(tiny_cohort, tmp_path, edit, message):
    data = _micro_study(tiny_cohort, tmp_path / "out")
    edit(data)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyConfigError, match=re.escape(message)):
        load_study(cfg)


def test_quick_study_config_is_valid():
    root = Path(__file__).resolve().parents[1]
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        s = load_study("experiments/studies/quick.yaml")
    finally:
        os.chdir(cwd)
    assert len(s.runs()) == 16 and s.reference == ("supervised_multimodal", "scratch")


def test_quickstart_study_scores_its_saved_predictions(tiny_cohort, tmp_path, monkeypatch, capsys):
    """make quickstart's study on the tiny cohort: JEPA from the pretraining's last.ckpt vs
    scratch, two seeds; the table, the paired difference and the pretraining's health line,
    then a second invocation that trains nothing and prints the same table."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    spec = yaml.safe_load(Path("experiments/studies/quickstart.yaml").read_text())
    spec["common_args"] = [*tiny_data_args(tiny_cohort), *QUIET, "--trainer.max_epochs=1",
                           "--trainer.check_val_every_n_epoch=1"]  # fmt: skip
    spec["subsets"] = [0, 1]
    cfg, out = tmp_path / "quickstart.yaml", tmp_path / "qs"
    cfg.write_text(yaml.safe_dump(spec))
    table = study.main(["--config", str(cfg), "--out", str(out)])
    assert list(zip(table["method"], table["cohort"], strict=True)) == [
        ("jepa", "external"), ("supervised", "external"), ("jepa", "internal"),
        ("supervised", "internal"),
    ]  # fmt: skip
    assert (table["n_subsets"] == 2).all() and table["auroc_sd"].notna().all()
    pretrained = runs.read_marker(out / "pretrain" / "jepa")
    # pretrain_checkpoint: last, although the checkpoint callback kept a "best" epoch too
    assert pretrained["checkpoint"] == str(out / "pretrain/jepa/checkpoints/last.ckpt")
    assert list((out / "pretrain/jepa/checkpoints").glob("epoch=*.ckpt"))
    assert pretrained["embed_dim"] == 96
    jepa_run = runs.read_marker(out / "runs" / "jepa__finetune__f1__s1")
    assert f"--model.init_args.init_from={pretrained['checkpoint']}" in jepa_run["argv"]
    assert "--seed_everything=1" in jepa_run["argv"]
    text = (out / "results.md").read_text()
    assert "| jepa / finetune | supervised / scratch | 100 % | internal | AUROC |" in text
    health = re.search(r"Pretraining jepa \(last\.ckpt\): image-only RankMe min "
                       r"(\d+\.\d{3}) of width 96 .*\(collapse: (none|point collapse|"
                       r"dimensional collapse|unknown)\)", text)  # fmt: skip
    assert health, text
    capsys.readouterr()
    again = study.main(["--config", str(cfg), "--out", str(out)])
    assert "4 already done, 0 to run" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, table)


def test_wandb_view_of_a_study_table_names_models_and_fractions():
    from jepa_lightning.evaluation.wandb_results import results_view

    table = pd.DataFrame(
        {"method": ["jepa", "jepa"], "protocol": ["finetune", "finetune"],
         "label_pct": [10.0, 100.0], "cohort": ["internal", "internal"], "n_scans": [72, 72],
         "auroc_mean": [0.7, 0.8], "auroc_sd": [0.01, 0.02], "auprc_mean": [0.5, 0.6],
         "auprc_sd": [0.03, 0.04]}
    )  # fmt: skip
    view = results_view(table)
    assert list(view["method"]) == ["jepa / finetune @ 10 %", "jepa / finetune @ 100 %"]
    assert list(view["AUROC"]) == [0.7, 0.8] and list(view["AUPRC_sd"]) == [0.03, 0.04]
    assert list(results_view(table.iloc[:1])["method"]) == ["jepa / finetune"]


# --- encoder inspection ---------------------------------------------------------------------
def test_inspect_encoder_writes_pngs(micro_study, tiny_cohort, tmp_path):
    ckpt = micro_study[1] / "pretrain" / "jepa" / "checkpoints" / "last.ckpt"
    out = tmp_path / "inspect"
    paths = inspect_encoder.main(
        ["--ckpt", str(ckpt), "--manifest", str(tiny_cohort / "manifest.parquet"),
         "--out", str(out), "--n-scans", "2", "--anchor", "1,2,1"]
    )  # fmt: skip
    assert [p.name for p in paths] == ["pca.png", "similarity.png"]
    import matplotlib.image as mpimg

    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="outside the patch grid"):
        inspect_encoder.main(
            ["--ckpt", str(ckpt), "--manifest", str(tiny_cohort / "manifest.parquet"),
             "--out", str(out), "--anchor", "9,0,0"]
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_encoder.main(["--ckpt", str(tmp_path / "x.ckpt"), "--manifest", "m", "--out", "o"])


def test_pca_and_similarity_maps_on_known_embeddings():
    import torch

    # Two kinds of patch (left half / right half) -> PC1 separates them; the anchor's own
    # patch has similarity 1 and the other kind is dissimilar.
    emb = torch.zeros(1, 2, 2, 4, 8)
    emb[..., :2, 0] = 1.0
    emb[..., 2:, 1] = 1.0
    emb += 0.01 * torch.randn_like(emb)
    rgb = inspect_encoder.pca_rgb(emb)
    assert rgb.shape == (1, 3, 2, 2, 4) and rgb.min() >= 0 and rgb.max() <= 1
    left, right = rgb[0, 0, ..., :2].mean(), rgb[0, 0, ..., 2:].mean()
    assert abs(left - right) > 0.8
    with pytest.raises(ValueError, match="two scans"):
        inspect_encoder.pca_rgb(emb, per_position=True)
    two = torch.cat([emb, emb.flip(-2)])  # second scan: the two kinds swapped
    rgb = inspect_encoder.pca_rgb(two, per_position=True)
    assert abs(rgb[0, 0, ..., :2].mean() - rgb[1, 0, ..., :2].mean()) > 0.8
    sim = inspect_encoder.anchor_similarity(emb, (0, 0, 0))
    assert sim[0, 0, 0, 0] == pytest.approx(1.0)
    assert sim[0, ..., :2].min() > 0.9 and sim[0, ..., 2:].max() < 0.1
