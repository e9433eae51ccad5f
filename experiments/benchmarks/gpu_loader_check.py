"""The device check: the real loader feeding the real Lightning step on CUDA -- data stall %
and MFU of a ViT-B/16 JEPA step at 128³.

What (g) ``gpu_feed`` estimates from the CPU side, measured end to end where a GPU is lent:
an archive of synthetic 128³ CTs (:func:`experiments.benchmarks.data_cache.write_archive`),
``CTEHRDataModule`` with the RAM cache (int16 entries), ``--workers`` loader processes, the
documented augmentation on the device (``augment_on: device``), the JEPA masks drawn in the
workers, and ``Trainer.fit`` in ``bf16-mixed``. After ``--warmup`` steps it records, per step:

* the wait: from the end of one training batch to the start of the next (fetching the next
  batch from the workers, the transfer and the device augmentation);
* the model FLOPs of the batch (:func:`experiments.benchmarks.flops.jepa_step_flops`).

stall % = total wait / window wall time; MFU = total model FLOPs / window wall time / the
card's dense bf16 peak. The GPU is synchronised at both ends of the window only.

    python -m experiments.benchmarks.gpu_loader_check --workers 14 --batch 32 --steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTAugment
from experiments.benchmarks.common import machine, sync
from experiments.benchmarks.data_cache import write_archive
from experiments.benchmarks.flops import jepa_step_flops
from experiments.benchmarks.gpu_feed import manifest_for
from experiments.benchmarks.gpu_mfu import VIT_B, peak_tflops
from experiments.benchmarks.jepa_step import build_task, lightning_trainer

# what jepa_step_flops reads of a batch (shapes only)
SHAPE_KEYS = ("image", "ctx_image_idx", "ctx_ehr_idx", "tgt_image_idx", "tgt_ehr_idx")


class StallMeter(L.Callback):
    """Wait between batches and model FLOPs per batch, after ``skip`` batches."""

    def __init__(self, skip: int):
        self.skip = skip
        self.waits: list[float] = []
        self.shapes: list[dict] = []
        self.flops: list[int] = []
        self.t0 = self.t1 = self.last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx == self.skip:
            sync()
            self.t0 = now = time.perf_counter()
        elif batch_idx > self.skip and self.last_end is not None:
            self.waits.append(now - self.last_end)
        if batch_idx >= self.skip:  # the shapes only: the FLOPs are counted after the window
            self.shapes.append({k: torch.empty(batch[k].shape, device="meta") for k in SHAPE_KEYS})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync()
        self.t1 = time.perf_counter()
        self.flops = [jepa_step_flops(pl_module, shapes).model_flops for shapes in self.shapes]


def run(size: int = 128, batch: int = 32, steps: int = 30, warmup: int = 5, workers: int = 14,
        n_scans: int = 256, device: str = "cuda", model: dict | None = None,
        peak: float | None = None, root: str | None = None) -> dict:  # fmt: skip
    """``device="cpu"`` with a tiny ``model`` only exercises the script (tests)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_loader_check needs a CUDA device")
    base = Path(root or tempfile.gettempdir()) / "jepa_bench_gpu_feed"
    items = write_archive(base / f"archive_{size}_{n_scans}", n_scans, size)
    manifest = manifest_for(items, base / f"archive_{size}_{n_scans}")
    dm = CTEHRDataModule(
        str(manifest), image_size=size, batch_size=batch, num_workers=workers,
        augment=CTAugment(), augment_on="device",
    )  # fmt: skip
    task = build_task(size, 1, **(model or VIT_B))
    meter = StallMeter(warmup)
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    trainer = lightning_trainer(warmup + steps, [meter], accelerator=device,
                                precision=precision)  # fmt: skip
    trainer.fit(task, datamodule=dm)
    seconds = meter.t1 - meter.t0
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_tf = peak_tflops(name, peak)
    return {
        "benchmark": "gpu_loader_check",
        "device": name,
        "config": (
            f"ViT dim {task.encoder.embed_dim} patch {task.backbone.patch_size}, {size}^3, batch "
            f"{batch}, {workers} loader workers, RAM cache (int16), CTAugment on the device, "
            f"{precision}, {steps} timed steps after {warmup}"
        ),
        "samples_per_s": round(batch * steps / seconds, 1),
        "data_stall_pct": round(100 * sum(meter.waits) / seconds, 1),
        "mfu_pct": round(100 * sum(meter.flops) / seconds / (peak_tf * 1e12), 1),
        "peak_bf16_tflops": peak_tf,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--scans", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    result = run(args.size, args.batch, args.steps, args.warmup, args.workers, args.scans,
                 peak=args.peak_tflops)  # fmt: skip
    print(json.dumps({"machine": machine(), **result}, indent=2))
    return result


if __name__ == "__main__":
    main()
