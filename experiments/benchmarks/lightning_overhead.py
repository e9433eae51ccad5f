"""(b) Lightning's overhead on a JEPA training step, against a plain-PyTorch loop.

Both run the same :class:`MultimodalJEPA` (same initial weights), the same prepared batches
with masks, AdamW with the task's parameter groups, the per-step LR schedule and the EMA
update (:class:`experiments.benchmarks.jepa_step.PlainJEPALoop`; a test checks the two
end with the same weights). The figure is the median time between consecutive step
starts; runs alternate Lightning / plain, each from a fresh copy of the model.

Why a paired figure too: on a shared host the speed of the same work drifts by ±15 % from
one 10-step round to the next (measured: per-round medians of 131–196 ms in one process),
far more than the 5 % being measured, so pooling all steps mixes slow and fast periods.
Each round runs the two loops back to back, in alternating order, and
``overhead_paired_pct`` is the median over rounds of the per-round ratio, with a bootstrap
95 % CI over rounds (``overhead_paired_ci``): the question "is Lightning within 5 %?" is
answered only when that CI says so. Lightning
runs without logger, checkpointing and progress bar (those write files or the terminal);
its ``self.log`` calls in ``training_step`` are counted (``train/loss`` every step, the
diagnostics only on the steps ``log_every_n_steps`` writes: default 50, so none here), the
plain loop logs nothing. Logging the six diagnostics on every step cost ~2.5 % more
(measured: paired 5.5 % [3.3, 6.8] over 30 rounds before, 2.3 % [0.3, 5.8] after).

    python -m experiments.benchmarks.lightning_overhead --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import json

import torch

from experiments.benchmarks.common import machine, median, paired_ratio, set_threads, spread
from experiments.benchmarks.jepa_step import (
    build_task,
    fresh,
    lightning_step_times,
    plain_step_times,
    quickstart_config,
    synthetic_batches,
)


def paired_overhead(
    lightning_ms: list[float], plain_ms: list[float]
) -> tuple[float, tuple[float, float]]:
    """Median over rounds of ``lightning / plain - 1`` (percent) and its bootstrap 95 % CI
    (each round's two figures were measured back to back)."""
    ratio, (low, high) = paired_ratio(lightning_ms, plain_ms)
    return 100 * (ratio - 1), (100 * (low - 1), 100 * (high - 1))


def run(rounds: int = 3, steps: int = 8, warmup_steps: int = 2) -> dict:
    cfg = quickstart_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    template = build_task(cfg["image_size"], cfg["n_ehr_features"], **cfg["model"])
    batches = synthetic_batches(template, warmup_steps + steps, cfg["batch_size"], device=device)
    wall: dict[str, list[float]] = {"lightning": [], "plain": []}
    cpu: dict[str, list[float]] = {"lightning": [], "plain": []}
    per_round: dict[str, list[float]] = {"lightning": [], "plain": []}
    runners = [("lightning", lightning_step_times), ("plain", plain_step_times)]
    for r in range(rounds):
        for name, runner in runners if r % 2 == 0 else runners[::-1]:
            w, c = runner(fresh(template), batches)
            # drop the warm-up steps' intervals (first-call allocations, lazy inits)
            wall[name] += w[warmup_steps:]
            cpu[name] += c[warmup_steps:]
            per_round[name].append(1e3 * median(w[warmup_steps:]))
    paired, (low, high) = paired_overhead(per_round["lightning"], per_round["plain"])
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
        "rounds": rounds,
        "round_step_ms": {k: [round(v, 1) for v in vs] for k, vs in per_round.items()},
        "overhead_paired_pct": round(paired, 1),
        "overhead_paired_ci": [round(low, 1), round(high, 1)],
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
