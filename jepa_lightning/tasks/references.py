"""Offline measures of an encoder's image-only features, for references beside the online
monitors: what a *random-init* encoder already scores (step 0) and what the trained one
scores (end of fit), on the same protocol.

Why offline: the online probe is trained by SGD alongside the encoder, so at step 0 it has
learnt nothing and cannot say what random features are worth. Here a logistic regression
is fitted on the labelled training scans' pooled features and scored (AUROC) on the
labelled validation scans; effective rank and feature spread are taken on the validation
embeddings, as ``val/rankme`` and the other collapse measures are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, default_collate

from jepa_lightning.collapse import collapse_measures


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collate(samples: list) -> dict:
    """Default collation of the usable samples (a skipped scan is ``None`` or marked)."""
    kept = [s for s in samples if s is not None and "skipped" not in s]
    return default_collate(kept) if kept else {}


@torch.no_grad()
def pooled_image_features(
    encoder: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    return_ids: bool = False,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean-pooled image-only encoder outputs ``[N, C]`` and labels ``[N]`` (NaN =
    unlabelled) of every scan of ``dataset`` (of each sequence's latest scan in sequence mode) (and their ``scan_id``s with ``return_ids``);
    under DDP each rank encodes its share and the shares are gathered, so every rank
    returns the whole split."""
    rank, world = _distributed()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=_collate)
    was_training = encoder.training
    encoder.eval()
    feats, labels, ids = [], [], []
    for batch in loader:
        if not batch:
            continue
        image = batch["image"]
        if image.ndim == 6:  # a patient sequence [B, S, 1, D, H, W]: its latest scan
            image = image[:, -1]
        hidden = encoder(image.to(device), None, None)
        pooled = hidden.mean(1) if pool is None else pool(hidden)
        feats.append(pooled.float().cpu().numpy())
        labels.append(batch["label"].float().cpu().numpy())
        ids += list(batch["scan_id"])
    encoder.train(was_training)
    dim = getattr(encoder, "embed_dim", 0)
    z = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, (z, y, ids))
        z = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        ids = [i for p in parts for i in p[2]]
    return (z, y, ids) if return_ids else (z, y)


def offline_probe_auroc(
    train_z: np.ndarray, train_y: np.ndarray, val_z: np.ndarray, val_y: np.ndarray
) -> float:
    """AUROC on the labelled validation scans of a logistic regression fitted on the labelled
    training scans (features standardised with training statistics); NaN when either side
    lacks one of the classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, va = ~np.isnan(train_y), ~np.isnan(val_y)
    if len(np.unique(train_y[tr])) < 2 or len(np.unique(val_y[va])) < 2:
        return math.nan
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    model.fit(train_z[tr], train_y[tr].astype(int))
    return float(roc_auc_score(val_y[va].astype(int), model.predict_proba(val_z[va])[:, 1]))


def encoder_references(
    encoder: nn.Module,
    datamodule,
    device: torch.device,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``probe_auroc`` (offline, image-only) and the collapse measures
    (:func:`~jepa_lightning.collapse.collapse_measures`: ``rankme``, ``centred_rank``,
    ``spread_share``, ``feature_std``) of the encoder on the data module's train/val splits
    (set up by the trainer)."""
    batch = int(getattr(datamodule, "batch_size", 16))
    val_z, val_y = pooled_image_features(
        encoder, datamodule.dataset("val"), batch, device, pool=pool
    )
    out = collapse_measures(torch.from_numpy(val_z))
    if np.isnan(val_y).all():
        return out
    train_z, train_y = pooled_image_features(
        encoder, datamodule.dataset("train"), batch, device, pool=pool
    )
    out["probe_auroc"] = offline_probe_auroc(train_z, train_y, val_z, val_y)
    return out
