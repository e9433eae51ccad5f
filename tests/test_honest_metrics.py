"""Degenerate cohorts give honest numbers (issue 14, case 5): a cohort with one class has
no AUROC, so it is NaN with a warning naming the cohort and its class counts, never 0.0."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from jepa_lightning.evaluation import stats
from jepa_lightning.main import main
from tests.ct_fixtures import nifti_archive
from tests.helpers import QUIET

METHODS = Path(__file__).resolve().parents[1] / "experiments" / "methods"


def test_one_class_labels_give_nan_metric_ci_and_a_warning():
    label = np.ones(6)
    assert stats.one_class_warning("cohort 'x'", [0, 1, np.nan]) is None
    message = stats.one_class_warning("test cohort 'external'", label)
    assert "test cohort 'external' has 6 positive and 0 negative labelled scans" in message
    assert np.isnan(stats.metric("auroc", np.linspace(0, 1, 6), label))
    resamples = stats.patient_bootstrap([f"p{i}" for i in range(6)], 20, 0)
    dist = stats.bootstrap_distribution("auroc", np.linspace(0, 1, 6), label, resamples)
    assert np.isnan(stats.percentile_ci(dist[:, 0])).all()


def test_one_class_test_cohort_is_nan_with_class_counts(tmp_path):
    archive = tmp_path / "archive"
    df = pd.read_parquet(nifti_archive(archive, n_test=8))
    df["image"] = [str(archive / p) for p in df["image"]]
    external = (df["split"] == "test") & (df["cohort"] == "external")
    df.loc[external, "label"] = 1.0  # an external cohort of malignant scans only
    manifest = tmp_path / "manifest.parquet"
    df.to_parquet(manifest)
    data = {"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(manifest), "image_size": 16, "batch_size": 8, "require_labels": True,
        "drop_last": False}}}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    cli = main(
        ["fit", "--config", str(METHODS / "supervised_image.yaml"),
         "--config", str(tmp_path / "data.yaml"),
         f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
         "--trainer.max_epochs=1", "--model.init_args.backbone.embed_dim=32",
         "--model.init_args.backbone.depth=1", *QUIET]
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert np.isnan(results["test/external/auroc"]) and np.isnan(results["test/external/auprc"])
    assert results["test/external/n_positive"] == results["test/external/n_scans"] > 0
    assert np.isfinite(results["test/internal/auroc"])
    text = [str(w.message) for w in caught if "test cohort 'external'" in str(w.message)]
    assert len(text) == 1 and "positive and 0 negative labelled scans" in text[0], text
    assert torch.isfinite(torch.tensor(results["test/internal/auprc"]))
