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

from jepa_lightning.collapse import centred_rank, rankme

#: image-side factors a good image embedding should make linearly readable
IMAGE_FACTORS = (
    "shared_0", "shared_1", "shared_2", "image_only_0", "image_only_1", "radius_mm",
    "density_hu", "spiculation", "lung_density_hu", "emphysema_fraction",
    "ground_glass_fraction", "vessel_radius_mm",
)  # fmt: skip


def ridge_predictions(train_z, train_y, val_z) -> np.ndarray:
    """Validation predictions of a ridge regression (penalty by internal CV on the training
    side) on features standardised with training statistics."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    return model.fit(train_z, train_y).predict(val_z)


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    """``1 - SSE / SST``; NaN for a constant ``truth``."""
    sst = ((truth - truth.mean()) ** 2).sum()
    return float(1.0 - ((pred - truth) ** 2).sum() / sst) if sst > 0 else math.nan


def ridge_r2(train_z, train_y, val_z, val_y) -> float:
    """Validation R^2 of :func:`ridge_predictions`."""
    return r2(ridge_predictions(train_z, train_y, val_z), val_y)


def probe_probabilities(train_z, train_y, val_z) -> np.ndarray:
    """Validation probabilities of a logistic probe fitted on every training scan's label."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, max_iter=2000))
    with warnings.catch_warnings():  # sklearn 1.8's notices of changing defaults
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(train_z, train_y.astype(int))
    return model.predict_proba(val_z)[:, 1]


def audit_encoder(encoder, datamodule, latents: pd.DataFrame, device: torch.device):
    """``(row, predictions)``: R^2 per factor, their mean, the full-label probe AUROC and the
    validation effective rank; and the validation predictions (one column per factor, plus
    ``label_prob``), indexed by ``scan_id``, for the paired bootstrap."""
    from jepa_lightning.evaluation.stats import metric
    from jepa_lightning.tasks.references import pooled_image_features

    batch = int(getattr(datamodule, "batch_size", 32))
    tr_z, _, tr_ids = pooled_image_features(
        encoder, datamodule.dataset("train"), batch, device, True
    )
    va_z, _, va_ids = pooled_image_features(encoder, datamodule.dataset("val"), batch, device, True)
    tr, va = latents.loc[tr_ids], latents.loc[va_ids]
    preds = pd.DataFrame(
        {f: ridge_predictions(tr_z, tr[f].to_numpy(), va_z) for f in IMAGE_FACTORS}, index=va_ids
    )
    preds["label_prob"] = probe_probabilities(tr_z, tr["true_label"].to_numpy(), va_z)
    row = {f: r2(preds[f].to_numpy(), va[f].to_numpy()) for f in IMAGE_FACTORS}
    row["mean_r2"] = float(np.nanmean([row[f] for f in IMAGE_FACTORS]))
    row["full_label_auroc"] = metric(
        "auroc", preds["label_prob"].to_numpy(), va["true_label"].to_numpy()
    )
    row["rankme"] = rankme(torch.from_numpy(va_z))
    row["centred_rank"] = centred_rank(torch.from_numpy(va_z))
    return row, preds


def paired_difference(
    model: pd.DataFrame, reference: pd.DataFrame, truth: pd.DataFrame, n_resamples: int = 1000
) -> dict[str, float]:
    """``model - reference`` of the mean R^2 and of the full-label AUROC on the same
    validation scans, with 95 % percentile CIs from one set of scan resamples (the cohort
    has one scan per patient)."""
    from jepa_lightning.evaluation.stats import (
        bootstrap_distribution,
        metric,
        paired_p_value,
        patient_bootstrap,
        percentile_ci,
    )

    truth = truth.loc[model.index]
    resamples = patient_bootstrap(list(model.index), n_resamples, seed=0)

    def mean_r2(preds: pd.DataFrame, idx: np.ndarray) -> float:
        return float(np.nanmean([r2(preds[f].to_numpy()[idx], truth[f].to_numpy()[idx])
                                 for f in IMAGE_FACTORS]))  # fmt: skip

    every = np.arange(len(truth))
    d_r2 = np.array([mean_r2(model, i) - mean_r2(reference, i) for i in resamples])
    probs = np.stack([model["label_prob"], reference.loc[model.index, "label_prob"]], axis=1)
    label = truth["true_label"].to_numpy()
    dist = bootstrap_distribution("auroc", probs, label, resamples)
    d_auc = dist[:, 0] - dist[:, 1]
    r2_low, r2_high = percentile_ci(d_r2)
    auc_low, auc_high = percentile_ci(d_auc)
    return {
        "mean_r2": mean_r2(model, every) - mean_r2(reference.loc[model.index], every),
        "mean_r2_ci_low": r2_low, "mean_r2_ci_high": r2_high, "mean_r2_p": paired_p_value(d_r2),
        "full_label_auroc": metric("auroc", probs[:, 0], label) - metric("auroc", probs[:, 1], label),
        "full_label_auroc_ci_low": auc_low, "full_label_auroc_ci_high": auc_high,
        "full_label_auroc_p": paired_p_value(d_auc),
    }  # fmt: skip


def run(ckpt: str, config: str, seed: int = 0) -> pd.DataFrame:
    """Audit table: a row for the random-init encoder, one for the checkpoint's target and
    their paired difference with bootstrap CIs (``*_ci_low``/``*_ci_high``, ``*_p``)."""
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
    hparams = {k: v for k, v in trained.hparams.items() if not k.startswith("_")}  # _class_path
    random_init = MultimodalJEPA(**hparams).target_encoder  # as the task inits it
    latents = datamodule.latents()
    device = torch.device("cpu")
    reference, reference_preds = audit_encoder(random_init, datamodule, latents, device)
    pretrained, pretrained_preds = audit_encoder(trained.encoder, datamodule, latents, device)
    delta = paired_difference(pretrained_preds, reference_preds, latents)
    rows = {"random init": reference, "pretrained": pretrained, "pretrained - random init": delta}
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
        print(table.T.round(3).to_string(na_rep=""))


if __name__ == "__main__":
    main()
