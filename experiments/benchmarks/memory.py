"""(e) Peak memory of a JEPA training step vs volume size, with and without activation
checkpointing (``grad_checkpointing``).

Each configuration runs in its own subprocess, so one configuration's peak cannot hide
another's. On CPU the figure is the process's peak resident set (``VmHWM``, reset just
before the measured step), with
glibc told to serve every allocation over 64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``)
so that freed tensors leave the resident set instead of lingering in the heap; reported
as the whole process's peak and as the step's peak above what is resident before it
(weights, AdamW state, batch). On a GPU it is ``torch.cuda.max_memory_allocated``.
Masks are the task's multi-block masks in joint mode (no modality drop, so every step
encodes image context).

    python -m experiments.benchmarks.memory --sizes 64 96 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from experiments.benchmarks.common import machine, set_threads
from experiments.benchmarks.jepa_step import ROOT, PlainJEPALoop, build_task, synthetic_batches

MODEL = dict(patch_size=16, embed_dim=384, depth=6, num_heads=6, predictor_dim=192,
             predictor_depth=2, predictor_heads=6, p_image_only=0.0, p_ehr_only=0.0)  # fmt: skip
BATCH = 2


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart the peak-RSS count from the current RSS (Linux >= 4.0: clear_refs 5).

    ``ru_maxrss`` would not do: it carries the parent's resident set over fork + exec.
    """
    Path("/proc/self/clear_refs").write_text("5")


def child(size: int, checkpointing: bool) -> dict:
    """One configuration, in this process: two training steps, the second one measured."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = build_task(size, 32, grad_checkpointing=checkpointing, **MODEL).to(device)
    batches = synthetic_batches(task, 2, BATCH, device=device)
    loop = PlainJEPALoop(task.train(), total_steps=10)
    loop.step(batches[0])  # allocates AdamW state
    loop.optimizer.zero_grad(set_to_none=True)  # so "before" holds weights + AdamW + batch
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        loop.step(batches[1])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda max_memory_allocated"
    else:
        gc.collect()
        before = _status_mb("VmRSS")
        reset_peak_rss()
        loop.step(batches[1])
        peak = _status_mb("VmHWM")
        kind = "peak RSS (VmHWM)"
    return {
        "volume": f"{size}^3",
        "tokens": task.encoder.num_patches,
        "grad_checkpointing": checkpointing,
        "measure": kind,
        "peak_mb": round(peak, 1),
        "step_peak_above_resident_mb": round(peak - before, 1),
    }


def run(sizes: tuple[int, ...] = (64, 96, 128), threads: int | None = None) -> dict:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for size in sizes:
        for ckpt in (False, True):
            cmd = [sys.executable, "-m", "experiments.benchmarks.memory", "--child",
                   "--sizes", str(size)] + (["--checkpointing"] if ckpt else [])  # fmt: skip
            if threads:
                cmd += ["--threads", str(threads)]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"memory benchmark child {cmd} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:  # saving of checkpointing per size
        if row["grad_checkpointing"]:
            base = next(
                r for r in rows if r["volume"] == row["volume"] and not r["grad_checkpointing"]
            )
            row["step_peak_saved_pct"] = round(
                100 * (1 - row["step_peak_above_resident_mb"] / base["step_peak_above_resident_mb"]), 1
            )  # fmt: skip
    return {
        "benchmark": "memory",
        "config": (
            f"JEPA step, ViT dim {MODEL['embed_dim']}, depth {MODEL['depth']}, patch "
            f"{MODEL['patch_size']}, predictor {MODEL['predictor_dim']}x{MODEL['predictor_depth']}, "
            f"batch {BATCH}, fp32, joint-mode multi-block masks"
        ),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.sizes[0], args.checkpointing)))
        return
    print(json.dumps({"machine": machine(), **run(tuple(args.sizes), args.threads)}, indent=2))


if __name__ == "__main__":
    main()
