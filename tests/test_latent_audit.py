"""The ground-truth audit of pooled image embeddings on the synthetic cohort."""

from __future__ import annotations

import lightning
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from data_modules.synthetic import SyntheticCohortDataModule
from jepa_lightning.evaluation.latent_audit import IMAGE_FACTORS, main, ridge_r2, run
from jepa_lightning.tasks import MultimodalJEPA
from tests.conftest import TINY

SMALL = dict(image_size=32, n_ehr_features=TINY["n_ehr_features"],
             backbone={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}, predictor_dim=8, predictor_depth=1, predictor_heads=2)  # fmt: skip


def _files(tmp_path, tiny_cohort, model: MultimodalJEPA):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)  # fmt: skip
    config = tmp_path / "fit.yaml"
    data = {
        "class_path": "SyntheticCohortDataModule",
        "init_args": {"root": str(tiny_cohort), **TINY},
    }
    config.write_text(yaml.safe_dump({"data": data}))
    return str(ckpt), str(config)


def test_ridge_r2_reads_a_linear_factor_and_not_noise():
    g = np.random.default_rng(0)
    z = g.normal(size=(300, 8))
    y = z @ g.normal(size=8)
    assert ridge_r2(z[:200], y[:200], z[200:], y[200:]) > 0.99
    assert ridge_r2(z[:200], g.normal(size=200), z[200:], g.normal(size=100)) < 0.1


def test_a_checkpoint_equal_to_the_random_init_audits_equal(tmp_path, tiny_cohort, capsys):
    torch.manual_seed(0)
    ckpt, config = _files(tmp_path, tiny_cohort, MultimodalJEPA(**SMALL))
    table = run(ckpt, config, seed=0)
    assert list(table.index) == ["random init", "pretrained", "pretrained - random init"]
    assert set(IMAGE_FACTORS) <= set(table.columns)
    cols = [*IMAGE_FACTORS, "mean_r2", "full_label_auroc", "rankme", "centred_rank"]
    assert np.allclose(table.loc["random init", cols].astype(float),
                       table.loc["pretrained", cols].astype(float))  # fmt: skip
    assert np.isfinite(table.loc["pretrained", "mean_r2"])
    delta = table.loc["pretrained - random init"]
    assert delta["mean_r2"] == 0 and delta["mean_r2_ci_low"] == delta["mean_r2_ci_high"] == 0
    assert delta["full_label_auroc"] == 0 and delta["full_label_auroc_p"] == 1.0


def test_other_weights_audit_differently_and_the_table_is_written(tmp_path, tiny_cohort, capsys):
    torch.manual_seed(1)
    ckpt, config = _files(tmp_path, tiny_cohort, MultimodalJEPA(**SMALL))
    main(["--ckpt", ckpt, "--config", config, "--out", str(tmp_path / "audit.csv")])
    assert "mean_r2" in capsys.readouterr().out
    table = __import__("pandas").read_csv(tmp_path / "audit.csv", index_col=0)
    assert table.loc["random init", "rankme"] != table.loc["pretrained", "rankme"]
    delta = table.loc["pretrained - random init"]
    assert delta["mean_r2_ci_low"] <= delta["mean_r2"] <= delta["mean_r2_ci_high"]
    assert delta["mean_r2"] == pytest.approx(
        table.loc["pretrained", "mean_r2"] - table.loc["random init", "mean_r2"]
    )


def test_a_real_archive_config_is_refused_by_name(tmp_path):
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule"}}))
    with pytest.raises(SystemExit, match="latents.parquet"):
        run("unused.ckpt", str(config))


def test_pooling_probe_scores_every_pooling_on_validation_scans(tmp_path, tiny_cohort):
    """The no-training read-out measurement (random-init encoders, validation scans only)."""
    from jepa_lightning.evaluation.pooling_probe import main as pooling_probe

    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {
        "class_path": "data_modules.ct_ehr.CTEHRDataModule",
        "init_args": {"manifest": str(tiny_cohort / "manifest.parquet"), "image_size": 16,
                      "batch_size": 8, "num_workers": 0},
    }}))  # fmt: skip
    table = pooling_probe(
        ["--data", str(data), "--patch", "8", "--seeds", "0", "--n-resamples", "50"]
    )
    assert list(table["pooling"]) == ["mean", "center", "center - mean"]
    assert table["auroc"].between(-1, 1).all() and (table["ci_low"] <= table["ci_high"]).all()
    delta = table.set_index("pooling")["auroc"]
    assert delta["center - mean"] == pytest.approx(delta["center"] - delta["mean"])


def _data_yaml(tmp_path, cohort, class_path: str) -> str:
    """A data YAML for pooling_probe: ``class_path`` on the tiny synthetic cohort."""
    path = tmp_path / "data.yaml"
    init_args = {"root": str(cohort), **TINY, "num_workers": 0}
    path.write_text(yaml.safe_dump({"data": {"class_path": class_path, "init_args": init_args}}))
    return str(path)


def test_pooling_probe_of_a_checkpoint_equal_to_its_random_init_reads_no_gain(
    tmp_path, tiny_cohort
):
    """``--ckpt``: a pretraining that changed nothing adds exactly nothing, per pooling; other
    weights read differently."""
    from jepa_lightning.evaluation.pooling_probe import main as pooling_probe

    torch.manual_seed(0)
    same, _ = _files(tmp_path, tiny_cohort, MultimodalJEPA(**SMALL))
    torch.manual_seed(5)
    other = tmp_path / "other"
    other.mkdir()
    changed, _ = _files(other, tiny_cohort, MultimodalJEPA(**SMALL))
    data = _data_yaml(tmp_path, tiny_cohort, "data_modules.synthetic.SyntheticCohortDataModule")
    args = ["--data", data, "--seeds", "0", "--n-resamples", "50", "--ckpt", same, changed]
    table = pooling_probe(args).set_index(["checkpoint", "pooling"])
    assert set(table.index.get_level_values("pooling")) == {"mean", "center"}
    for pooling in ("mean", "center"):
        row = table.loc[(same, pooling)]
        assert row["delta"] == 0 and row["delta_low"] == row["delta_high"] == 0
        assert row["auroc"] == row["random_init"] and row["encoder"] == "target_encoder"
    # other weights, other probabilities: the paired bootstrap no longer reads exactly 0
    assert (table.loc[changed, "delta_low"] < table.loc[changed, "delta_high"]).all()


class CohortWithNodules(SyntheticCohortDataModule):
    """A synthetic cohort that lists its lesions the way LIDC's data module does."""

    def nodules(self) -> pd.DataFrame:
        latents = self.latents()
        r, density, spiculation = (
            latents["radius_mm"],
            latents["density_hu"],
            latents["spiculation"],
        )
        return latents.assign(
            consensus_volume_mm3=4 / 3 * np.pi * r**3, diameter_mm=2 * r, subtlety_median=r,
            texture_median=density, calcification_median=density,
            spiculation_median=spiculation, margin_median=spiculation,
        )  # fmt: skip


def test_pooling_probe_audits_the_lesion_where_the_data_lists_its_lesions(
    tmp_path, tiny_cohort, capsys
):
    from jepa_lightning.evaluation.pooling_probe import LESION_FACTS
    from jepa_lightning.evaluation.pooling_probe import main as pooling_probe

    torch.manual_seed(0)
    ckpt, _ = _files(tmp_path, tiny_cohort, MultimodalJEPA(**SMALL))
    data = _data_yaml(tmp_path, tiny_cohort, "tests.test_latent_audit.CohortWithNodules")
    table = pooling_probe(["--data", data, "--seeds", "0", "--n-resamples", "20", "--ckpt", ckpt])
    audit = table.attrs["lesion_audit"].set_index("encoder")
    assert {f"center/{f}" for f in LESION_FACTS} <= set(audit.columns)
    # the checkpoint is the seed-0 random init: the audit reads the same R² for both
    cols = [c for c in audit.columns if "/" in c]
    assert np.allclose(audit.loc["pretrained", cols].astype(float),
                       audit.loc["random init (mean)", cols].astype(float), equal_nan=True)  # fmt: skip
    assert "lesion audit" in capsys.readouterr().out
