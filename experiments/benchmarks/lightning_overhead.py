"""(b) Lightning's overhead on a JEPA training step, against a plain-PyTorch loop.

Both run the same :class:`MultimodalJEPA` (same initial weights), the same prepared batches
with masks, AdamW with the task's parameter groups, the per-step LR schedule and the EMA
update (:class:`experiments.benchmarks.jepa_step.PlainJEPALoop`; a test checks the two
end with the same weights). The figure is the median time between consecutive step
starts; runs alternate Lightning / plain, each from a fresh copy of the model. Lightning
runs without logger, checkpointing and progress bar (those write files or the terminal);
its ``self.log`` calls in ``training_step`` are counted, the plain loop logs nothing.

    python -m experiments.benchmarks.lightning_overhead --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import json

import torch

from experiments.benchmarks.common import machine, median, set_threads, spread
from experiments.benchmarks.jepa_step import (
    build_task,
    fresh,
    lightning_step_times,
    plain_step_times,
    quickstart_config,
    synthetic_batches,
)


def run(rounds: int = 3, steps: int = 8, warmup_steps: int = 2) -> dict:
    cfg = quickstart_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    template = build_task(cfg["image_size"], cfg["n_ehr_features"], **cfg["model"])
    batches = synthetic_batches(template, warmup_steps + steps, cfg["batch_size"], device=device)
    wall: dict[str, list[float]] = {"lightning": [], "plain": []}
    cpu: dict[str, list[float]] = {"lightning": [], "plain": []}
    runners = {"lightning": lightning_step_times, "plain": plain_step_times}
    for _ in range(rounds):
        for name, runner in runners.items():
            w, c = runner(fresh(template), batches)
            # drop the warm-up steps' intervals (first-call allocations, lazy inits)
            wall[name] += w[warmup_steps:]
            cpu[name] += c[warmup_steps:]
    med = {k: median(v) for k, v in wall.items()}
    med_cpu = {k: median(v) for k, v in cpu.items()}
    return {
        "benchmark": "lightning_overhead",
        "config": (
            f"quickstart JEPA: {cfg['image_size']}^3, patch {cfg['model']['patch_size']}, "
            f"dim {cfg['model']['embed_dim']}, depth {cfg['model']['depth']}, "
            f"batch {cfg['batch_size']}, {device}"
        ),
        "steps_timed": {k: len(v) for k, v in wall.items()},
        "step_ms": {k: round(1e3 * v, 1) for k, v in med.items()},
        "step_cpu_ms": {k: round(1e3 * v, 1) for k, v in med_cpu.items()},
        "spread_iqr": {k: round(spread(v), 3) for k, v in wall.items()},
        "overhead_pct": round(100 * (med["lightning"] / med["plain"] - 1), 1),
        "overhead_cpu_pct": round(100 * (med_cpu["lightning"] / med_cpu["plain"] - 1), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(json.dumps({"machine": machine(), **run(args.rounds, args.steps)}, indent=2))


if __name__ == "__main__":
    main()
