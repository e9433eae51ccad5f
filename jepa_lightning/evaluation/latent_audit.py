"""What did pretraining put into the pooled image embedding? A ground-truth audit on the
synthetic cohort.

The online and offline probes answer one question with ~100 labels, so their AUROCs carry
CIs of +-0.05 and cannot tell "learnt nothing" from "learnt something else". The synthetic
generator records every patient's causes, nodule and diffuse findings
(``latents.parquet``); this audit fits a ridge regression from the pooled image-only
embedding of *all* training scans to each of them and scores R^2 on the validation scans
(never the test scans), beside a logistic probe on every training scan's true label. It
does so for the checkpoint's target encoder and for a random-init encoder of the same
shape, so the question "did pretraining add anything a linear read-out can use?" has a
direct answer per factor.

    python -m jepa_lightning.evaluation.latent_audit --ckpt runs/quickstart/pretrain/checkpoints/last.ckpt \\
        --config experiments/quickstart/pretrain.yaml
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from jepa_lightning.collapse import effective_rank

#: image-side factors a good image embedding should make linearly readable
IMAGE_FACTORS = (
    "shared_0", "shared_1", "shared_2", "image_only_0", "image_only_1", "radius_mm",
    "density_hu", "spiculation", "lung_density_hu", "emphysema_fraction",
    "ground_glass_fraction", "vessel_radius_mm",
)  # fmt: skip


def ridge_r2(
    train_z: np.ndarray, train_y: np.ndarray, val_z: np.ndarray, val_y: np.ndarray
) -> float:
    """Validation R^2 of a ridge regression (penalty by internal CV on the training side) on
    features standardised with training statistics."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_z, train_y)
    residual = ((model.predict(val_z) - val_y) ** 2).mean()
    return float(1.0 - residual / val_y.var()) if val_y.var() > 0 else math.nan


def full_label_auroc(train_z, train_y, val_z, val_y) -> float:
    """AUROC on validation of a logistic probe fitted on every training scan's true label."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, max_iter=2000))
    with warnings.catch_warnings():  # sklearn 1.8's notices of changing defaults
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(train_z, train_y.astype(int))
    return float(roc_auc_score(val_y.astype(int), model.predict_proba(val_z)[:, 1]))


def audit_encoder(encoder, datamodule, latents: pd.DataFrame, device: torch.device) -> dict:
    """R^2 per factor, the full-label probe AUROC and the validation effective rank."""
    from jepa_lightning.tasks.references import pooled_image_features

    batch = int(getattr(datamodule, "batch_size", 32))
    tr_z, _, tr_ids = pooled_image_features(
        encoder, datamodule.dataset("train"), batch, device, True
    )
    va_z, _, va_ids = pooled_image_features(encoder, datamodule.dataset("val"), batch, device, True)
    tr, va = latents.loc[tr_ids], latents.loc[va_ids]
    row = {f: ridge_r2(tr_z, tr[f].to_numpy(), va_z, va[f].to_numpy()) for f in IMAGE_FACTORS}
    row["mean_r2"] = float(np.nanmean([row[f] for f in IMAGE_FACTORS]))
    row["full_label_auroc"] = full_label_auroc(
        tr_z, tr["true_label"].to_numpy(), va_z, va["true_label"].to_numpy()
    )
    row["effective_rank"] = effective_rank(torch.from_numpy(va_z))
    return row


def run(ckpt: str, config: str, seed: int = 0) -> pd.DataFrame:
    """Audit table: one row for the random-init encoder, one for the checkpoint's target."""
    from data_modules.synthetic import SyntheticCohortDataModule
    from jepa_lightning.encoder_export import load_encoder
    from jepa_lightning.tasks import MultimodalJEPA

    data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
    if not str(data.get("class_path", "")).endswith("SyntheticCohortDataModule"):
        raise SystemExit(
            f"error: {config}: data.class_path must be SyntheticCohortDataModule -- the audit "
            "needs the generator's latents.parquet, which a real archive does not have"
        )
    args = {**(data.get("init_args") or {}), "num_workers": 0}
    datamodule = SyntheticCohortDataModule(**args)
    datamodule.prepare_data()
    datamodule.setup("fit")
    trained = load_encoder(ckpt)  # the EMA target encoder, strict, weights_only
    torch.manual_seed(seed)
    random_init = MultimodalJEPA(**trained.hparams).target_encoder  # as the task inits it
    latents = datamodule.latents()
    device = torch.device("cpu")
    rows = {
        "random init": audit_encoder(random_init, datamodule, latents, device),
        "pretrained": audit_encoder(trained.encoder, datamodule, latents, device),
    }
    return pd.DataFrame(rows).T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a MultimodalJEPA checkpoint")
    parser.add_argument("--config", required=True, help="its fit YAML (synthetic data section)")
    parser.add_argument("--out", help="also write the table as CSV here")
    ns = parser.parse_args(argv)
    table = run(ns.ckpt, ns.config)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(ns.out)
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(table.T.round(3).to_string())


if __name__ == "__main__":
    main()
