"""``python -m jepa_lightning.embed CKPT [MANIFEST] [--config data.yaml] --out emb.parquet``:
embeddings of any manifest straight from a pretraining (or DiagnosisTask) checkpoint.

The manifest is read by ``CTEHRDataModule`` with the checkpoint's preprocessing and EHR
normalisation (so a new archive is coded as the training one was); each scan gets one row:
``scan_id, patient_id, cohort, label, emb_0 .. emb_{C-1}``. ``--config`` takes the data
config training used, so whatever trained (an ``ehr_table``, a cohort data module) embeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.data_config import datamodule_from_configs
from data_modules.manifest import ManifestError
from data_modules.transforms import CTPreprocess
from jepa_lightning.encoder_export import PretrainedEncoder, load_encoder


def datamodule_for(model: PretrainedEncoder, manifest: str | None, split: str, batch_size: int,
                   num_workers: int = 0, configs: list[str] | None = None) -> CTEHRDataModule:  # fmt: skip
    """A data module reading ``manifest`` as the checkpoint's training data was read.

    With ``configs`` (the ``--config`` files training used), the data module their ``data:``
    block describes (EHR table and join, ROI space, cohort class ...), with the checkpoint's
    preprocessing and EHR statistics set on it; ``manifest``, when given, replaces its own."""
    pre = model.preprocessing or {"image_size": model.hparams["image_size"]}
    stats = model.ehr_normalisation
    if configs:
        return _from_configs(model, pre, stats, manifest, split, batch_size, num_workers, configs)
    if manifest is None:
        raise ValueError("give a MANIFEST or the data config training used (--config)")
    dm = CTEHRDataModule(
        manifest,
        image_size=pre["image_size"],
        batch_size=batch_size,
        num_workers=num_workers,
        hu_window=tuple(pre.get("hu_window", (-1000.0, 400.0))),
        preprocess=CTPreprocess(**pre["preprocess"]) if pre.get("preprocess") else None,
        ehr_columns=stats["columns"] if stats else None,
        predict_split=split,
        cache_volumes=False,
        drop_last=False,
    )
    if stats is not None:
        try:
            dm.ehr_feature_names  # noqa: B018  (the columns exist: else say how to fix it)
        except ManifestError as err:
            raise ManifestError(
                f"{err}; if training read them from an EHR table (ehr_table) or another data "
                "block, pass the data config training used: --config my_data.yaml"
            ) from err
        dm.ehr_stats = stats  # the training split's statistics, not this manifest's
    return dm


def _from_configs(model, pre, stats, manifest, split, batch_size, num_workers, configs):
    """The training data block, read the checkpoint's way (see :func:`datamodule_for`)."""
    overrides = {"batch_size": batch_size, "num_workers": num_workers,
                 "predict_split": split, "cache_volumes": False, "drop_last": False}  # fmt: skip
    dm = datamodule_from_configs(configs, **overrides)
    if manifest is not None:
        dm.manifest = manifest
    size = pre["image_size"]
    dm.image_size = [size] * 3 if isinstance(size, int) else list(size)
    dm.hu_window = tuple(pre.get("hu_window", dm.hu_window))
    if pre.get("preprocess"):
        dm.preprocess = CTPreprocess(**pre["preprocess"])
    if stats is not None:
        if list(stats["columns"]) != list(dm.ehr_feature_names):
            raise ValueError(
                f"the checkpoint was trained on EHR columns {stats['columns']}; the data config "
                f"gives {dm.ehr_feature_names}: pass the data config the checkpoint was trained with"
            )
        dm.ehr_stats = stats
    return dm


def embed_manifest(model: PretrainedEncoder, dm: CTEHRDataModule, modalities: str) -> pd.DataFrame:
    dm.setup("predict")
    rows, embs = [], []
    for batch in dm.predict_dataloader():
        if not batch:
            continue
        image = batch["image"] if "image" in modalities else None
        ehr = batch["ehr"] if "ehr" in modalities else None
        missing = batch["ehr_missing"] if "ehr" in modalities else None
        embs.append(model.embed(image, ehr, missing).float().numpy())
        rows += [{"scan_id": s, "patient_id": p, "cohort": c, "label": float(y)} for s, p, c, y
                 in zip(batch["scan_id"], batch["patient_id"], batch["cohort"],
                        batch["label"].tolist(), strict=True)]  # fmt: skip
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    table = pd.DataFrame(rows)
    return pd.concat(
        [table, pd.DataFrame(emb, columns=[f"emb_{i}" for i in range(emb.shape[1])])], axis=1
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jepa_lightning.embed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("ckpt", help="a jepa-lightning checkpoint (.ckpt)")
    parser.add_argument(
        "manifest", nargs="?", help="manifest (.csv/.parquet) of the scans to embed (default "
        "with --config: the data block's own)",
    )  # fmt: skip
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="a training config (repeatable, merged in order as fit merges them): its data: "
        "block (EHR table, ROI space, cohort class ...) reads the scans",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output .parquet")
    parser.add_argument("--split", default="all", choices=["train", "val", "test", "all"])
    parser.add_argument("--encoder", default="auto", choices=["auto", "target", "context"])
    parser.add_argument("--modalities", default="image", choices=["image", "ehr", "image+ehr"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".parquet" or out.exists():
        print(f"error: --out {out} must be a new .parquet file", file=sys.stderr)
        return 2
    with torch.no_grad():  # not set_grad_enabled(False): main() runs in-process in tests
        model = load_encoder(args.ckpt, args.encoder)
        dm = datamodule_for(model, args.manifest, args.split, args.batch_size, args.num_workers,
                            args.config)  # fmt: skip
        table = embed_manifest(model, dm, args.modalities)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    print(f"wrote {len(table)} embeddings ({model.source}, {args.modalities}) to {out}")
    return 0


if __name__ == "__main__":
    from jepa_lightning.user_errors import run_reporting_user_errors

    run_reporting_user_errors(lambda: sys.exit(main()))
