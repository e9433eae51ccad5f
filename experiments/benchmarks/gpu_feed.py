"""(g) Feeding a GPU: what one loader worker process delivers at 96³ and 128³, against what
a ViT-B/16 JEPA step consumes at 45 % MFU of a named card.

For each volume size, an archive of synthetic CTs of that size (lung-like texture and a
nodule, int16 NIfTI) read by ``CTEHRDataModule`` exactly as training reads it: batch
``--batch``, **one worker process** (``num_workers: 1``), the documented augmentation
(``CTAugment()``: flips, 90° turns, intensity shift), cache entries as int16 codes
(:mod:`data_modules.compact_volume`), volumes from

* the RAM cache (filled at setup), or
* the disk cache (filled by one pass beforehand, read memory-mapped),

with the augmentation either in the worker (``augment_on: loader``, per sample, MONAI) or
after the transfer (``augment_on: device``: the worker reads and collates only; the batched
augmentation's own cost on this CPU is printed apart -- on a GPU it runs there). The first
batch (worker start) is not timed.

The demand: the model FLOPs per sample of the GPU benchmark's JEPA step (ViT-B/16, predictor
384 x 6; :func:`experiments.benchmarks.flops.jepa_step_flops`, mask shapes of real batches)
at 45 % MFU of the card's dense bf16 peak. The ratio is ``workers`` (16: a 16-core GPU node)
times one worker's rate over that demand: >= 1 keeps the GPU busy.

    python -m experiments.benchmarks.gpu_feed --sizes 96 128 --card "H100 SXM"
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_modules.batch_augment import BatchAugment
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTAugment
from experiments.benchmarks.common import machine, markdown_table, median, set_threads
from experiments.benchmarks.data_cache import write_archive
from experiments.benchmarks.flops import jepa_step_flops
from experiments.benchmarks.gpu_mfu import VIT_B, peak_tflops
from experiments.benchmarks.jepa_step import build_task, synthetic_batches

MFU = 0.45


def demand_samples_per_s(size: int, card: str, batch: int = 4) -> tuple[float, float]:
    """(model GFLOP per sample, samples/s the card consumes at ``MFU``) for the ViT-B/16 JEPA
    step at ``size``³."""
    task = build_task(size, 32, **VIT_B)
    flops = [
        jepa_step_flops(task, b).model_flops / batch for b in synthetic_batches(task, 6, batch)
    ]
    per_sample = float(np.mean(flops))
    return per_sample / 1e9, MFU * peak_tflops(card, None) * 1e12 / per_sample


def manifest_for(items: list[dict], root: Path, n_val: int = 4) -> Path:
    rows = [
        {"patient_id": f"p{i}", "scan_id": f"s{i}", "image": it["path"], "label": float(i % 2),
         "split": "val" if i < n_val else "train", "ehr_age": float(i)}
        for i, it in enumerate(items)
    ]  # fmt: skip
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def loader_rate(dm: CTEHRDataModule, n_batches: int) -> float:
    """Samples/s of the training loader over ``n_batches`` (cycling epochs), first batch
    (worker start) excluded."""
    loader = dm.train_dataloader()
    seen, t0 = 0, None
    while True:
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += len(batch["image"])
            n_batches -= 1
            if n_batches == 0:
                return seen / (time.perf_counter() - t0)


def device_augment_rate(size: int, batch: int, repeats: int = 5) -> float:
    """Samples/s of the batched augmentation on this CPU (the GPU runs it in practice)."""
    augment = BatchAugment(CTAugment())
    x = torch.rand(batch, 1, size, size, size)
    augment(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        augment(x)
        times.append(time.perf_counter() - t0)
    return batch / median(times)


def run(sizes=(96, 128), n_scans: int = 40, batch: int = 8, n_batches: int = 12,
        workers: int = 16, card: str = "H100 SXM", root: str | None = None) -> dict:  # fmt: skip
    base = Path(root or tempfile.gettempdir()) / "jepa_bench_gpu_feed"
    rows = []
    for size in sizes:
        items = write_archive(base / f"archive_{size}", n_scans, size)
        manifest = manifest_for(items, base / f"archive_{size}")
        gflop, demand = demand_samples_per_s(size, card)
        for cache in ("ram", "disk"):
            cache_dir = base / f"cache_{size}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            for place in ("loader", "device"):
                dm = CTEHRDataModule(
                    str(manifest), image_size=size, batch_size=batch, num_workers=1,
                    augment=CTAugment(), augment_on=place, cache_volumes=cache == "ram",
                    cache_dir=str(cache_dir) if cache == "disk" else None,
                )  # fmt: skip
                dm.setup("fit")
                if cache == "disk":  # fill the disk cache before timing
                    for i in range(len(dm.dataset("train"))):
                        dm.dataset("train").volume(i)
                rate = loader_rate(dm, n_batches)
                rows.append({
                    "volume": f"{size}^3", "cache": cache, "augment_on": place,
                    "loader_samples_per_s_per_worker": round(rate, 1),
                    "demand_samples_per_s": round(demand, 0), "model_gflop_per_sample": round(gflop, 1),
                    f"{workers}_workers_over_demand": round(workers * rate / demand, 2),
                })  # fmt: skip
        rows[-1]["device_augment_cpu_samples_per_s"] = round(device_augment_rate(size, batch), 1)
    return {
        "benchmark": "gpu_feed",
        "config": (
            f"{n_scans} synthetic CTs per size, batch {batch}, one worker process, "
            f"CTAugment() (flips 0.5, 90° turns 0.5, intensity shift 0.5), int16 cache entries; "
            f"demand: ViT-B/16 JEPA step at {int(MFU * 100)} % MFU of {card} "
            f"({peak_tflops(card, None):.0f} TFLOP/s dense bf16); ratio for {workers} workers"
        ),
        "rows": rows,
    }


def table(result: dict) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if k != "device_augment_cpu_samples_per_s"]
    body = [[r[k] for k in keys] for r in rows]
    text = f"**(g) feeding a GPU** ({result['config']})\n\n" + markdown_table(keys, body)
    extra = [f"{r['volume']}: {r['device_augment_cpu_samples_per_s']} samples/s" for r in rows
             if "device_augment_cpu_samples_per_s" in r]  # fmt: skip
    return (
        text
        + "\n\nBatched augmentation on this CPU (a GPU runs it in practice): "
        + "; ".join(extra)
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--scans", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--workers", type=int, default=16, help="worker processes of the GPU node")
    p.add_argument("--card", default="H100 SXM")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--root", default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    result = run(
        args.sizes, args.scans, args.batch, args.batches, args.workers, args.card, args.root
    )
    print(json.dumps({"machine": machine(), **result}, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
