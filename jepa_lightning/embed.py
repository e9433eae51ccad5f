"""``python -m jepa_lightning.embed CKPT MANIFEST --out embeddings.parquet``: embeddings of
any manifest straight from a pretraining (or DiagnosisTask) checkpoint.

The manifest is read by ``CTEHRDataModule`` with the checkpoint's preprocessing and EHR
normalisation (so a new archive is coded as the training one was); each scan gets one row:
``scan_id, patient_id, cohort, label, emb_0 .. emb_{C-1}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTPreprocess
from jepa_lightning.encoder_export import PretrainedEncoder, load_encoder


def datamodule_for(model: PretrainedEncoder, manifest: str, split: str, batch_size: int,
                   num_workers: int = 0) -> CTEHRDataModule:  # fmt: skip
    """A data module reading ``manifest`` as the checkpoint's training data was read."""
    pre = model.preprocessing or {"image_size": model.hparams["image_size"]}
    stats = model.ehr_normalisation
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
        dm.ehr_stats = stats  # the training split's statistics, not this manifest's
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
    parser.add_argument("manifest", help="manifest (.csv/.parquet) of the scans to embed")
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
        dm = datamodule_for(model, args.manifest, args.split, args.batch_size, args.num_workers)
        table = embed_manifest(model, dm, args.modalities)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    print(f"wrote {len(table)} embeddings ({model.source}, {args.modalities}) to {out}")
    return 0


if __name__ == "__main__":
    from jepa_lightning.user_errors import run_reporting_user_errors

    run_reporting_user_errors(lambda: sys.exit(main()))
