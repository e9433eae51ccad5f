"""(d) Data path: loader throughput vs model step throughput at the quickstart scale.

The quickstart data module (``SyntheticCohortDataModule`` with the quickstart YAML's image
size, batch size and ``num_workers``) on a smaller synthetic cohort (the per-sample cost does
not depend on the cohort size), with the task's JEPA mask collator as ``collate_hook``:

* loader alone: samples/s of iterating the training loader (worker start excluded);
* model alone: samples/s of the JEPA training step (plain loop) on batches already in memory;
* both together: the training loop fed by the loader, and the share of its time spent
  waiting for the next batch (the data stall).

Measured with the in-memory volume cache (the quickstart default) and without it (every
volume decoded from NIfTI and preprocessed per sample, the path for archives larger than
memory). It also checks where the masks are built: the collator records its process id,
which must not be the training process when ``num_workers > 0``.

    python -m experiments.benchmarks.data_path --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from data_modules.synthetic import SyntheticCohortDataModule
from experiments.benchmarks.common import machine, median, set_threads
from experiments.benchmarks.jepa_step import PlainJEPALoop, build_task, quickstart_config
from jepa_lightning.masking import JEPAMaskCollator

COHORT = dict(n_patients=160, n_external=20, labeled_fraction=0.25, seed=0)
QUICKSTART_COHORT = dict(n_patients=1400, n_external=200, labeled_fraction=0.1, seed=0)


class PidRecordingCollator:
    """The task's mask collator, plus the id of the process that ran it (picklable)."""

    def __init__(self, inner: JEPAMaskCollator):
        self.inner = inner

    def __call__(self, batch: dict) -> dict:
        batch = self.inner(batch)
        batch["collate_pid"] = os.getpid()
        return batch


def loader_batches(loader, n: int) -> tuple[list[dict], float]:
    """``n`` batches from ``loader`` (cycling epochs) and the seconds it took, not counting
    the first batch (worker start-up)."""
    out: list[dict] = []
    t0 = None
    while len(out) < n + 1:
        for batch in loader:
            out.append(batch)
            if t0 is None:
                t0 = time.perf_counter()
            if len(out) == n + 1:
                break
    return out[1:], time.perf_counter() - t0


def measure(dm: SyntheticCohortDataModule, task, n_batches: int) -> dict:
    loader = dm.train_dataloader()
    batches, loader_s = loader_batches(loader, n_batches)
    samples = sum(len(b["image"]) for b in batches)
    pids = {b["collate_pid"] for b in batches}
    task.train()
    loop = PlainJEPALoop(task, 1000)
    loop.step(batches[0])  # warm-up
    step_s = []
    for b in batches:
        t0 = time.perf_counter()
        loop.step(b)
        step_s.append(time.perf_counter() - t0)
    model_sps = len(batches[0]["image"]) / median(step_s)
    # training loop fed by the loader: time blocked on the next batch vs total
    wait = 0.0
    it = iter(loader)
    next(it)  # start-up
    t_all = time.perf_counter()
    for _ in range(n_batches):
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        wait += time.perf_counter() - t0
        loop.step(b)
    total = time.perf_counter() - t_all
    return {
        "num_workers": dm.num_workers,
        "cache_volumes": dm.cache_volumes,
        "loader_samples_per_s": round(samples / loader_s, 1),
        "model_samples_per_s": round(model_sps, 1),
        "loader_over_model": round(samples / loader_s / model_sps, 2),
        "data_stall_pct": round(100 * wait / total, 1),
        "masks_built_in_workers": (os.getpid() not in pids) if dm.num_workers > 0 else None,
    }


def run(root: str | None = None, n_batches: int = 6, cohort: dict | None = None) -> dict:
    """``cohort``: the synthetic cohort's size settings (default :data:`COHORT`; the
    quickstart's own, 1,400 patients, gives its number of batches per epoch: each new epoch
    restarts the workers' prefetch, so a small cohort overstates the stall)."""
    cfg = quickstart_config()
    cohort = cohort or COHORT
    root = root or os.path.join(tempfile.gettempdir(), f"jepa_bench_cohort_{cohort['n_patients']}")
    task = build_task(cfg["image_size"], cfg["n_ehr_features"], **cfg["model"])
    rows = []
    for cache in (True, False):
        dm = SyntheticCohortDataModule(
            root=str(Path(root)), image_size=cfg["image_size"], batch_size=cfg["batch_size"],
            num_workers=cfg["num_workers"], n_ehr_features=cfg["n_ehr_features"],
            cache_volumes=cache, **cohort,
        )  # fmt: skip
        dm.prepare_data()
        dm.setup("fit")
        dm.collate_hook = PidRecordingCollator(task.mask_collator())
        rows.append(measure(dm, task, n_batches))
    return {
        "benchmark": "data_path",
        "config": (
            f"quickstart data: {cfg['image_size']}^3, batch {cfg['batch_size']}, "
            f"num_workers {cfg['num_workers']} (quickstart YAML), cohort {cohort['n_patients']} "
            f"patients ({len(dm.train_dataloader())} training batches per epoch); JEPA masks in "
            "the collate"
        ),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", default=None, help="cohort folder (generated on first use)")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument(
        "--quickstart-cohort", action="store_true",
        help="the quickstart's cohort (1,400 + 200 patients, 10 %% labelled) instead of 160",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    cohort = QUICKSTART_COHORT if args.quickstart_cohort else None
    print(json.dumps({"machine": machine(), **run(args.root, args.batches, cohort)}, indent=2))


if __name__ == "__main__":
    main()
