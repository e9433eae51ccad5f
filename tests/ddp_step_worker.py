"""One SGD step of every task, on one process or as one rank of a DDP run (the worker of
``tests/test_ddp_equivalence.py``; run as ``python -m tests.ddp_step_worker OUT TASK...``).

The global batch (``GLOBAL_BATCH`` samples, fixed by a seed) and every random view are the
same whatever the world size: JEPA masks are drawn once for the global batch and sliced,
and MAE's / MSN's on-step draws are replaced by :class:`GlobalDraws`, which draws for the
whole global batch from a fixed generator and hands each rank its rows. So one step on
2 ranks x B must give the weights of one step on 1 process x 2B. SGD with lr 1 (not the
tasks' AdamW, whose first step is about ``sign(grad)`` and would hide a wrong gradient
magnitude). Each process writes ``OUT/<task>-rank<r>-of-<world>.pt`` with the weights before
and after the step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from jepa_lightning.masking import JEPAMaskCollator
from jepa_lightning.masking import focal_masks as _focal_masks
from jepa_lightning.masking import random_masks as _random_masks
from jepa_lightning.tasks import (
    MAE,
    MSN,
    DiagnosisTask,
    ImageEHRContrastive,
    JEPAContrastive,
    LongitudinalDiagnosisTask,
    MultimodalJEPA,
    TemporalJEPA,
)
from jepa_lightning.tasks import base as task_base
from jepa_lightning.tasks.baselines import mae as mae_module
from jepa_lightning.tasks.baselines import msn as msn_module

GLOBAL_BATCH = 6
SIZE, N_EHR, SLOTS = 16, 5, 2
COMMON = dict(image_size=SIZE, n_ehr_features=N_EHR, backbone="micro", reference_metrics=False)
#: labels of the global batch: rank 0 of 2 holds 1 labelled scan, rank 1 holds 3
LABELS = [1.0, float("nan"), float("nan"), 1.0, 0.0, 0.0]


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalDraws:
    """Stand-ins for the on-step random view functions: the k-th call draws for all
    ``GLOBAL_BATCH`` samples from a generator seeded with k and returns the rows of this
    rank's samples (rank r of N holds rows r·B/N onwards), whatever the local batch size."""

    def __init__(self):
        self.calls = 0

    def _generator(self) -> torch.Generator:
        self.calls += 1
        return torch.Generator().manual_seed(1000 + self.calls)

    @staticmethod
    def _rows(b: int) -> slice:
        rank, world = rank_world()
        start = rank * (GLOBAL_BATCH // world)
        return slice(start, start + b)

    def random_masks(self, b, n, n_keep, device=None, generator=None):
        keep, masked = _random_masks(GLOBAL_BATCH, n, n_keep, device, self._generator())
        return keep[self._rows(b)], masked[self._rows(b)]

    def focal_masks(self, b, grid, block, device=None, generator=None):
        return _focal_masks(GLOBAL_BATCH, grid, block, device, self._generator())[self._rows(b)]

    def random_flips(self, volume, generator=None):
        g = self._generator()
        for axis in (2, 3, 4):
            flip = (torch.rand(GLOBAL_BATCH, generator=g) < 0.5)[self._rows(len(volume))]
            volume = torch.where(flip.view(-1, 1, 1, 1, 1), volume.flip(axis), volume)
        return volume


def sgd_optimizers(self):
    """One plain SGD step (lr 1), so the weight change is the gradient itself."""
    return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


def global_batch(sequence: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    b = GLOBAL_BATCH
    batch = {
        "image": torch.randn(b, 1, SIZE, SIZE, SIZE, generator=g),
        "ehr": torch.randn(b, N_EHR, generator=g),
        "ehr_missing": torch.rand(b, N_EHR, generator=g) < 0.3,
        "label": torch.tensor(LABELS),
        "patient_id": [f"p{i}" for i in range(b)],
        "scan_id": [f"s{i}" for i in range(b)],
        "cohort": ["internal"] * b,
    }
    if sequence:  # two scan slots; patients 1 and 4 have only the latest scan (left-padded)
        for key in ("image", "ehr", "ehr_missing"):
            earlier = batch[key].roll(1, dims=0)
            batch[key] = torch.stack([earlier, batch[key]], dim=1)
        batch["scan_mask"] = torch.ones(b, SLOTS, dtype=torch.bool)
        batch["scan_mask"][[1, 4], 0] = False
        batch["scan_times"] = torch.tensor([[-90.0, 0.0]] * b)
        batch["scan_times"][[1, 4], 0] = 0.0
    return batch


def with_jepa_masks(batch: dict, use_ehr: bool) -> dict:
    collator = JEPAMaskCollator(
        grid=(2, 2, 2), n_ehr_features=N_EHR, n_blocks=2, block_scale=(0.15, 0.3),
        use_ehr=use_ehr, p_image_only=0.0, p_ehr_only=0.0, min_context=2, rank=0,
    )  # fmt: skip
    torch.manual_seed(3)  # the collator's stream: the same on every rank (rank fixed to 0)
    batch.update(collator.masks(GLOBAL_BATCH))
    return batch


JEPA = dict(predictor_dim=32, predictor_depth=1, sigreg_weight=0.5, variance_weight=0.5)
TASKS: dict[str, tuple[Callable[[], L.LightningModule], Callable[[], dict]]] = {
    "jepa": (
        lambda: MultimodalJEPA(**COMMON, **JEPA),
        lambda: with_jepa_masks(global_batch(False), True),
    ),
    "jepa_cross_modal": (
        lambda: MultimodalJEPA(**COMMON, **JEPA, cross_modal_weight=0.5),
        lambda: with_jepa_masks(global_batch(False), True),
    ),
    "jepa_contrastive": (
        lambda: JEPAContrastive(**COMMON, **JEPA),
        lambda: with_jepa_masks(global_batch(False), True),
    ),
    "ijepa": (
        lambda: MultimodalJEPA(**COMMON, **JEPA, use_ehr=False),
        lambda: with_jepa_masks(global_batch(False), False),
    ),
    "temporal_jepa": (
        lambda: TemporalJEPA(**COMMON, **JEPA),
        lambda: with_jepa_masks(global_batch(True), True),
    ),
    "mae": (lambda: MAE(**COMMON, decoder_dim=32, decoder_depth=1), lambda: global_batch(False)),
    "msn": (lambda: MSN(**COMMON, focal_block=(1, 1, 1)), lambda: global_batch(False)),
    "msn_ehr": (
        lambda: MSN(**COMMON, focal_block=(1, 1, 1), use_ehr=True),
        lambda: global_batch(False),
    ),
    "clip": (lambda: ImageEHRContrastive(**COMMON), lambda: global_batch(False)),
    "diagnosis": (
        lambda: DiagnosisTask(**{k: v for k, v in COMMON.items() if k != "reference_metrics"}),
        lambda: global_batch(False),
    ),
    "longitudinal": (
        lambda: LongitudinalDiagnosisTask(
            **{k: v for k, v in COMMON.items() if k != "reference_metrics"}
        ),
        lambda: global_batch(True),
    ),
}


class RankShard(Dataset):
    """One batch: the global batch's rows of this rank (all of it on one process); with
    ``empty_rank`` set, that rank's batch is empty, as when all its scans were skipped."""

    def __init__(self, batch: dict, empty_rank: int | None = None):
        self.batch, self.empty_rank = batch, empty_rank

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        rank, world = rank_world()
        if rank == self.empty_rank and world > 1:
            return {}
        share = GLOBAL_BATCH // world
        rows = slice(rank * share, (rank + 1) * share)
        out = {}
        for key, value in self.batch.items():
            sliceable = torch.is_tensor(value) or isinstance(value, list)
            out[key] = value[rows] if sliceable and len(value) == GLOBAL_BATCH else value
        return out


def run(task: str, out: Path, empty_rank: int | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    make_model, make_batch = TASKS[task]
    L.seed_everything(0, verbose=False)
    model = make_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = make_batch()
    if empty_rank is not None and world == 1:  # the reference: only the other rank's rows
        keep = slice(0, GLOBAL_BATCH // 2) if empty_rank == 1 else slice(GLOBAL_BATCH // 2, None)
        batch = {
            k: v[keep]
            if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == GLOBAL_BATCH
            else v
            for k, v in batch.items()
        }
    loader = DataLoader(RankShard(batch, empty_rank), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)
    rank = trainer.global_rank
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    suffix = "" if empty_rank is None else f"-empty{empty_rank}"
    torch.save({"before": before, "after": after}, out / f"{task}{suffix}-rank{rank}-of-{world}.pt")


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    empty_rank = None
    if rest and rest[0].startswith("--empty-rank="):
        empty_rank, rest = int(rest[0].split("=")[1]), rest[1:]
    draws = GlobalDraws()
    mae_module.random_masks = draws.random_masks
    msn_module.random_masks = draws.random_masks
    msn_module.focal_masks = draws.focal_masks
    msn_module.random_flips = draws.random_flips
    task_base.BaseTask.configure_optimizers = sgd_optimizers
    launch_env = dict(os.environ)
    for task in rest:
        # Lightning's DDP teardown clears the launch variables (WORLD_SIZE, ...) and the
        # process group; each task's Trainer starts from the environment the test gave.
        os.environ.clear()
        os.environ.update(launch_env)
        draws.calls = 0
        run(task, out, empty_rank)


if __name__ == "__main__":
    main(sys.argv[1:])
