"""(f) GPU: ViT-B/16 multimodal JEPA step at 128^3 (512 tokens) in bf16 — samples/s and MFU.

Runs only where CUDA is available (``make bench`` skips it on CPU). The step is the real
one: ``Trainer.fit`` (``precision=bf16-mixed``) over prepared batches carrying the task's
own multi-block masks (all three JEPA modes), so Lightning, the EMA and AdamW are included.

How MFU is computed (printed with the result):

    MFU = (sum over timed steps of model FLOPs of the step) / (timed wall seconds) / peak

* model FLOPs per step: ``experiments.benchmarks.flops.jepa_step_flops`` from the model's
  sizes and that batch's mask shapes: matrix products only, backward = 2x forward
  (weight-only gradients 1x), the EMA target encoder forward only; recomputation (flash
  attention's backward, activation checkpointing) not counted. It is cross-checked against
  ``torch.utils.flop_counter.FlopCounterMode`` on one real step, which counts the kernels
  that actually ran (flash backward included, so it reads a little higher).
* peak: the card's dense bf16 tensor-core peak from the table below (by device name), or
  ``--peak-tflops``.
* wall seconds: from the start of the first timed batch to the end of training, with the
  GPU synchronised at both ends only (no per-step sync).

    python -m experiments.benchmarks.gpu_mfu --batch 32 --steps 20 [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.benchmarks.common import machine, sync
from experiments.benchmarks.flops import jepa_step_flops
from experiments.benchmarks.jepa_step import (
    PlainJEPALoop,
    batch_loader,
    build_task,
    fresh,
    lightning_trainer,
    synthetic_batches,
)

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # unknown H100 form factor: the lower (PCIe) peak, so MFU is not understated
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}
VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, predictor_dim=384,
             predictor_depth=6, predictor_heads=12)  # fmt: skip


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key.lower() in name.lower():
            return value
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")


class WindowTimer(L.Callback):
    """Wall time from the start of batch ``skip`` to the end of training, GPU synced at both
    ends only."""

    def __init__(self, skip: int):
        self.skip, self.t0, self.t1 = skip, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            sync()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync()
        self.t1 = time.perf_counter()


def counted_flops(task, batch: dict, device: str) -> int:
    """FLOPs of one real bf16 step as ``FlopCounterMode`` sees the kernels."""
    loop = PlainJEPALoop(fresh(task).to(device).train(), 10)
    with torch.autocast(device, dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        loop.step(batch)
    return fc.get_total_flops()


def run(batch: int = 32, steps: int = 20, warmup: int = 5, size: int = 128,
        compile: bool = False, peak: float | None = None, device: str = "cuda",
        model: dict | None = None) -> dict:  # fmt: skip
    """``device="cpu"`` with a tiny ``model`` only exercises the script (tests)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mfu needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    task = build_task(size, 32, compile=compile, **(model or VIT_B))
    batches = synthetic_batches(task, warmup + steps, batch, device=device)
    flops = [jepa_step_flops(task, b).model_flops for b in batches[warmup:]]
    counted = counted_flops(task, batches[warmup], device)
    timer = WindowTimer(warmup)
    trainer = lightning_trainer(warmup + steps, [timer], accelerator=device, precision="bf16-mixed")
    trainer.fit(task, train_dataloaders=batch_loader(batches))
    seconds = timer.t1 - timer.t0
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_tf = peak_tflops(name, peak)
    achieved = sum(flops) / seconds
    return {
        "benchmark": "gpu_mfu",
        "device": name,
        "config": (
            f"JEPA, ViT dim {task.encoder.embed_dim} depth {task.backbone.depth} patch "
            f"{task.backbone.patch_size}, {size}^3 ({task.encoder.num_patches} tokens), "
            f"batch {batch}, bf16-mixed, compile {compile}"
        ),
        "samples_per_s": round(batch * steps / seconds, 1),
        "step_ms": round(1e3 * seconds / steps, 1),
        "model_gflop_per_step": round(sum(flops) / len(flops) / 1e9, 3),
        "counted_gflop_first_step": round(counted / 1e9, 3),
        "analytic_gflop_first_step": round(flops[0] / 1e9, 3),
        "achieved_tflops": round(achieved / 1e12, 1),
        "peak_bf16_tflops": peak_tf,
        "mfu_pct": round(100 * achieved / (peak_tf * 1e12), 1),
        "peak_memory_gb": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
        ),
        "how": "MFU = sum(analytic model FLOPs of timed steps) / timed wall s / dense bf16 peak",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    result = run(args.batch, args.steps, size=args.size, compile=args.compile,
                 peak=args.peak_tflops)  # fmt: skip
    print(json.dumps({"machine": machine(), **result}, indent=2))


if __name__ == "__main__":
    main()
