"""Does the read-out see the lesion? A frozen image-only probe of random-init encoders on the
validation scans, with each token pooling, before any pretraining.

Why: on LIDC-IDRI every pretraining's frozen features were compared against a random
encoder's, both read out by the mean of all tokens. This measures how much of that gap is the
read-out itself: for each patch size and init seed, a random ``micro`` encoder's pooled
image features of the training scans fit a logistic regression (C by internal CV on the
training side) that scores the labelled *validation* scans (test scans are never read). The
probabilities are averaged over the seeds; the AUROC of each pooling and the difference
``center - mean`` get patient-level bootstrap 95 % CIs (paired, the same resamples).

    python -m jepa_lightning.evaluation.pooling_probe --data experiments/lidc/data.yaml \\
        --patch 8 4 --seeds 0 1 2

With ``--ckpt`` it asks whether a pretraining adds to a random encoder when both are read
the same way: each checkpoint's encoder (the EMA target where the method has one) against
random inits of the same architecture (probabilities averaged over ``--seeds``), with the
paired patient-bootstrap CI of the difference, per pooling. Where the data module lists its
lesions (LIDC's ``nodules()``), a lesion audit follows: the validation R² of ridge
regressions of the nodule's log-volume, diameter and median ratings on each pooling's
features, pretrained against random init:

    python -m jepa_lightning.evaluation.pooling_probe --data experiments/lidc/data.yaml \\
        --ckpt runs/lidc-jepa/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from jepa_lightning.backbones import MultimodalEncoder, as_backbone
from jepa_lightning.backbones.pooling import POOLINGS, pool_tokens


def build_datamodule(path: str):
    """The data module of a YAML holding a ``data:`` block (or the block itself)."""
    cfg = yaml.safe_load(Path(path).read_text())
    cfg = cfg.get("data", cfg)
    module, _, name = cfg["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module or "data_modules"), name)
    return cls(**cfg.get("init_args", {}))


@torch.no_grad()
def image_tokens(encoder, dataset, batch_size: int = 64):
    """Image-only encoder tokens ``[N, T, C]``, labels, patient ids and scan ids of a
    dataset."""
    from torch.utils.data import DataLoader

    from jepa_lightning.tasks.references import _collate

    tokens, labels, patients, scans = [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=_collate):
        if batch:
            tokens.append(encoder(batch["image"], None, None))
            labels.append(batch["label"].float())
            patients += list(batch["patient_id"])
            scans += list(batch["scan_id"])
    return torch.cat(tokens), torch.cat(labels).numpy(), patients, scans


def pooled_splits(encoder, dm, center_size: int) -> dict:
    """``{split: (features per pooling, labels, patient ids, scan ids)}`` for train and val."""
    out = {}
    for split in ("train", "val"):
        tokens, labels, patients, scans = image_tokens(encoder, dm.dataset(split))
        pooled = {
            p: pool_tokens(tokens, tokens.shape[1], encoder.grid, p, center_size).numpy()
            for p in POOLINGS
        }
        out[split] = (pooled, labels, patients, scans)
    return out


def probe_by_pooling(features: dict) -> tuple[dict, np.ndarray, list]:
    """Validation probabilities of a logistic-regression probe per pooling (fitted on the
    labelled training scans), the validation labels and patient ids (labelled scans)."""
    from jepa_lightning.evaluation.latent_audit import probe_probabilities

    ztr, ytr, _, _ = features["train"]
    zva, yva, pva, _ = features["val"]
    lab_tr, lab_va = ~np.isnan(ytr), ~np.isnan(yva)
    probs = {p: probe_probabilities(ztr[p][lab_tr], ytr[lab_tr], zva[p][lab_va]) for p in POOLINGS}
    patients = [p for p, keep in zip(pva, lab_va, strict=True) if keep]
    return probs, yva[lab_va].astype(int), patients


# What a lesion audit regresses from the pooled features, where the data module lists its
# lesions (LIDC's nodules(): volume from the consensus contour, the readers' median ratings).
LESION_FACTS = {
    "log_volume": lambda n: np.log(n["consensus_volume_mm3"].clip(lower=1.0)),
    "diameter_mm": lambda n: n["diameter_mm"],
    "texture": lambda n: n["texture_median"],
    "calcification": lambda n: n["calcification_median"],
    "spiculation": lambda n: n["spiculation_median"],
    "margin": lambda n: n["margin_median"],
    "subtlety": lambda n: n["subtlety_median"],
}


def lesion_r2(features: dict, nodules: pd.DataFrame) -> dict[str, float]:
    """Validation R² of a ridge regression of each lesion fact on each pooling's features
    (fitted on every training nodule, labelled or not), keyed ``"{pooling}/{fact}"``."""
    from jepa_lightning.evaluation.latent_audit import ridge_r2

    ztr, _, _, str_ = features["train"]
    zva, _, _, sva = features["val"]
    out = {}
    for fact, value in LESION_FACTS.items():
        ytr = value(nodules.loc[str_]).to_numpy(dtype=float)
        yva = value(nodules.loc[sva]).to_numpy(dtype=float)
        for p in POOLINGS:
            out[f"{p}/{fact}"] = ridge_r2(ztr[p], ytr, zva[p], yva)
    return out


def run_checkpoints(
    data: str, ckpts: list[str], seeds: list[int], center_size: int, n_resamples: int
) -> pd.DataFrame:
    """Each checkpoint's encoder against random inits of its architecture, per pooling."""
    from jepa_lightning.backbones.presets import ARCHITECTURE_FIELDS
    from jepa_lightning.evaluation import stats
    from jepa_lightning.pretrained import checkpoint_architecture, encoder_from_checkpoint

    dm = build_datamodule(data)
    dm.setup("fit")
    nodules = dm.nodules() if hasattr(dm, "nodules") else None
    rows, audit = [], []
    for ckpt in ckpts:
        encoder, hparams, _, source = encoder_from_checkpoint(ckpt, "auto", "probed checkpoint")
        features = pooled_splits(encoder, dm, center_size)
        trained, label, patients = probe_by_pooling(features)
        arch = checkpoint_architecture(hparams, ckpt)
        backbone = {k: arch[k] for k in ARCHITECTURE_FIELDS}
        random: dict[str, list[np.ndarray]] = {p: [] for p in POOLINGS}
        random_r2 = []
        for seed in seeds:
            torch.manual_seed(seed)
            init = MultimodalEncoder(  # as the task inits its encoder
                image_size=arch["image_size"], n_ehr_features=arch["n_ehr_features"],
                backbone=backbone, residual_rescale=bool(hparams.get("residual_rescale", False)),
            ).eval()  # fmt: skip
            init_features = pooled_splits(init, dm, center_size)
            for pooling, probs in probe_by_pooling(init_features)[0].items():
                random[pooling].append(probs)
            if nodules is not None:
                random_r2.append(lesion_r2(init_features, nodules))
        if nodules is not None:
            audit.append(
                {"checkpoint": ckpt, "encoder": "pretrained", **lesion_r2(features, nodules)}
            )
            audit.append({"checkpoint": ckpt, "encoder": "random init (mean)",
                          **pd.DataFrame(random_r2).mean().to_dict()})  # fmt: skip
        resamples = stats.patient_bootstrap(patients, n_resamples, seed=0)
        for pooling in POOLINGS:
            both = np.stack([trained[pooling], np.mean(random[pooling], axis=0)], axis=1)
            dist = stats.bootstrap_distribution("auroc", both, label, resamples)
            auroc = [stats.metric("auroc", both[:, i], label) for i in range(2)]
            lo, hi = stats.percentile_ci(dist[:, 0])
            d_lo, d_hi = stats.percentile_ci(dist[:, 0] - dist[:, 1])
            rows.append(
                {"checkpoint": ckpt, "encoder": source, "pooling": pooling, "auroc": auroc[0],
                 "ci_low": lo, "ci_high": hi, "random_init": auroc[1], "delta": auroc[0] - auroc[1],
                 "delta_low": d_lo, "delta_high": d_hi, "n_val": len(label)}
            )  # fmt: skip
    table = pd.DataFrame(rows)
    table.attrs["lesion_audit"] = pd.DataFrame(audit)
    return table


def run(data: str, patches: list[int], seeds: list[int], center_size: int, n_resamples: int):
    from jepa_lightning.evaluation import stats

    dm = build_datamodule(data)
    dm.setup("fit")
    size = list(dm.image_size)
    rows = []
    for patch in patches:
        probs: dict[str, list[np.ndarray]] = {p: [] for p in POOLINGS}
        for seed in seeds:
            torch.manual_seed(seed)
            backbone = as_backbone({"preset": "micro", "patch_size": patch})
            encoder = MultimodalEncoder(
                image_size=size, n_ehr_features=dm.n_ehr_features, backbone=backbone
            ).eval()
            by_pooling, label, patients = probe_by_pooling(pooled_splits(encoder, dm, center_size))
            for pooling, p in by_pooling.items():
                probs[pooling].append(p)
        mean_probs = np.stack([np.mean(probs[p], axis=0) for p in POOLINGS], axis=1)
        resamples = stats.patient_bootstrap(patients, n_resamples, seed=0)
        dist = stats.bootstrap_distribution("auroc", mean_probs, label, resamples)
        for i, pooling in enumerate(POOLINGS):
            per_seed = [stats.metric("auroc", p, label) for p in probs[pooling]]
            low, high = stats.percentile_ci(dist[:, i])
            rows.append(
                {"patch": patch, "pooling": pooling, "auroc": stats.metric("auroc", mean_probs[:, i], label),
                 "ci_low": low, "ci_high": high, "seed_mean": np.mean(per_seed),
                 "seed_sd": np.std(per_seed), "n_val": len(label)}
            )  # fmt: skip
        delta = dist[:, 1] - dist[:, 0]
        low, high = stats.percentile_ci(delta)
        rows.append(
            {"patch": patch, "pooling": "center - mean", "auroc": rows[-1]["auroc"] - rows[-2]["auroc"],
             "ci_low": low, "ci_high": high, "n_val": len(label)}
        )  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="YAML with the data block")
    parser.add_argument("--patch", type=int, nargs="+", default=[8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--center-size", type=int, default=2)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument(
        "--ckpt", nargs="+", help="pretraining checkpoints to probe against random inits"
    )
    ns = parser.parse_args(argv)
    if ns.ckpt:
        table = run_checkpoints(ns.data, ns.ckpt, ns.seeds, ns.center_size, ns.n_resamples)
    else:
        table = run(ns.data, ns.patch, ns.seeds, ns.center_size, ns.n_resamples)
    print(table.round(3).to_string(index=False, na_rep=""))
    audit = table.attrs.get("lesion_audit")
    if audit is not None and len(audit):
        print("\nlesion audit: validation R² of ridge regressions on the pooled features")
        print(audit.set_index(["checkpoint", "encoder"]).T.round(3).to_string())
    return table


if __name__ == "__main__":
    main()
