"""What every benchmark shares: interleaved timing, medians, the machine's description.

Timing rules (all benchmarks): the variants being compared run in one process, interleaved
round by round (A, B, A, B, ...) after warm-up, so load from other processes hits them
alike; the reported figure is the median. The machine line records threads and the load
average, because on a shared machine a figure is only as good as the quiet it was taken in.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (None: leave torch's default); returns the count."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the figures were measured; the load average says how shared the machine was."""
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict) -> str:
    line = (
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, "
        f"torch {info['torch']}, load average {info['load_avg_1m']}"
    )
    if info.get("gpu"):
        line += f", GPU {info['gpu']}"
    if info["load_avg_1m"] is not None and info["load_avg_1m"] > (info["cores"] or 1):
        line += " (busier than its core count: absolute figures are pessimistic and noisy)"
    return line


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) at once.

    On a quiet machine wall time is the figure. On a shared one a process may be off the
    CPU most of the time; with one torch thread, CPU seconds then still measure the work
    done, so benchmarks report both (``--threads 1`` makes the CPU figure meaningful).
    """

    @staticmethod
    def now() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, cpu) seconds of one call, device work included."""
    w0, c0 = Clock.now()
    fn()
    w1, c1 = Clock.now()
    return w1 - w0, c1 - c0


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each variant, one call of each per round; the order
    rotates from round to round, so no variant always runs first (or right after another)."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            w, c = timed(variants[name])
            if r >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu


def paired_ratio(
    numerator: list[float], denominator: list[float], seed: int = 0, n_resamples: int = 2000
) -> tuple[float, tuple[float, float]]:
    """Median over rounds of ``numerator / denominator`` and its bootstrap 95 % CI.

    Why paired: a shared host's speed drifts by ±15 % between rounds, more than most of the
    differences measured; the two figures of one round were taken back to back, so their
    ratio cancels the drift that a ratio of medians pooled over all rounds keeps. The CI
    resamples rounds.
    """
    ratios = np.asarray(numerator) / np.asarray(denominator)
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(ratios, (n_resamples, len(ratios))), axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(np.median(ratios)), (float(low), float(high))


def intervals(stamps: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive ``Clock.now()`` stamps."""
    pairs = list(zip(stamps, stamps[1:], strict=False))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative interquartile range: how far the rounds disagree (0.1 = 10 %)."""
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
