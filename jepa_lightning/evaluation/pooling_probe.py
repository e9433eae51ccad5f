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
paired patient-bootstrap CI of the difference, per pooling:

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
    """Image-only encoder tokens ``[N, T, C]``, labels and patient ids of a dataset."""
    from torch.utils.data import DataLoader

    from jepa_lightning.tasks.references import _collate

    tokens, labels, patients = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=_collate):
        if batch:
            tokens.append(encoder(batch["image"], None, None))
            labels.append(batch["label"].float())
            patients += list(batch["patient_id"])
    return torch.cat(tokens), torch.cat(labels).numpy(), patients


def probe_by_pooling(encoder, dm, center_size: int) -> tuple[dict, np.ndarray, list]:
    """Validation probabilities of a logistic-regression probe per pooling (fitted on the
    labelled training scans), the validation labels and patient ids (labelled scans)."""
    from jepa_lightning.evaluation.latent_audit import probe_probabilities

    tr, ytr, _ = image_tokens(encoder, dm.dataset("train"))
    va, yva, pva = image_tokens(encoder, dm.dataset("val"))
    lab_tr, lab_va = ~np.isnan(ytr), ~np.isnan(yva)
    probs = {}
    for pooling in POOLINGS:
        ztr = pool_tokens(tr, tr.shape[1], encoder.grid, pooling, center_size).numpy()
        zva = pool_tokens(va, va.shape[1], encoder.grid, pooling, center_size).numpy()
        probs[pooling] = probe_probabilities(ztr[lab_tr], ytr[lab_tr], zva[lab_va])
    patients = [p for p, keep in zip(pva, lab_va, strict=True) if keep]
    return probs, yva[lab_va].astype(int), patients


def run_checkpoints(
    data: str, ckpts: list[str], seeds: list[int], center_size: int, n_resamples: int
) -> pd.DataFrame:
    """Each checkpoint's encoder against random inits of its architecture, per pooling."""
    from jepa_lightning.backbones.presets import ARCHITECTURE_FIELDS
    from jepa_lightning.evaluation import stats
    from jepa_lightning.pretrained import checkpoint_architecture, encoder_from_checkpoint

    dm = build_datamodule(data)
    dm.setup("fit")
    rows = []
    for ckpt in ckpts:
        encoder, hparams, _, source = encoder_from_checkpoint(ckpt, "auto", "probed checkpoint")
        trained, label, patients = probe_by_pooling(encoder, dm, center_size)
        arch = checkpoint_architecture(hparams, ckpt)
        backbone = {k: arch[k] for k in ARCHITECTURE_FIELDS}
        random: dict[str, list[np.ndarray]] = {p: [] for p in POOLINGS}
        for seed in seeds:
            torch.manual_seed(seed)
            init = MultimodalEncoder.from_backbone(  # as the task inits its encoder
                arch["image_size"], arch["n_ehr_features"], backbone, False,
                bool(hparams.get("residual_rescale", False)),
            ).eval()  # fmt: skip
            for pooling, probs in probe_by_pooling(init, dm, center_size)[0].items():
                random[pooling].append(probs)
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
    return pd.DataFrame(rows)


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
            encoder = MultimodalEncoder.from_backbone(size, dm.n_ehr_features, backbone).eval()
            by_pooling, label, patients = probe_by_pooling(encoder, dm, center_size)
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
    return table


if __name__ == "__main__":
    main()
