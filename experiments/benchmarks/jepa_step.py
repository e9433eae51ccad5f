"""One JEPA training step, outside and inside Lightning, on batches built once up front.

Shared by the JEPA benchmarks: the quickstart configuration (read from the quickstart YAML,
so the benchmark follows the config users run), synthetic batches carrying the masks the
task's own collator draws, and :class:`PlainJEPALoop`, a plain-PyTorch loop doing the same
computation as Lightning's automatic optimisation of :class:`MultimodalJEPA` (forward,
zero_grad, backward, AdamW step, per-step LR schedule, EMA once per optimizer step).
``tests/test_benchmarks.py`` checks that both give the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from experiments.benchmarks.common import Clock, intervals
from jepa_lightning.backbones import as_backbone
from jepa_lightning.backbones.presets import ARCHITECTURE_FIELDS
from jepa_lightning.schedules import ema_momentum, ema_start_for_share, ema_update_, warmup_cosine
from jepa_lightning.tasks import MultimodalJEPA

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_YAML = ROOT / "experiments" / "quickstart" / "pretrain.yaml"
MODEL_KEYS = (
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "predictor_dim",
    "predictor_depth", "predictor_heads", "use_ehr", "n_blocks", "variance_weight", "lr",
    "weight_decay", "warmup_fraction",
)  # fmt: skip


def quickstart_config() -> dict[str, Any]:
    """Model and data settings of the quickstart pretraining YAML (model + image/batch/workers)."""
    cfg = yaml.safe_load(QUICKSTART_YAML.read_text())
    init_args = cfg["model"]["init_args"]
    arch = as_backbone(init_args.get("backbone")).as_dict()  # flat keys, for the printouts
    arch.pop("preset")
    model = {**arch, **{k: v for k, v in init_args.items() if k in MODEL_KEYS}}
    data = cfg["data"]["init_args"]
    return {
        "model": model,
        "image_size": data.get("image_size", 32),
        "n_ehr_features": data.get("n_ehr_features", 32),
        "batch_size": data.get("batch_size", 32),
        "num_workers": data.get("num_workers", 0),
    }


def build_task(image_size: int, n_ehr_features: int, seed: int = 0, **model: Any) -> MultimodalJEPA:
    """A JEPA task; the benchmarks' flat architecture keys (``embed_dim=384, depth=6``) are
    folded into its ``backbone`` block (starting from the ``micro`` preset)."""
    torch.manual_seed(seed)
    arch = {k: model.pop(k) for k in ARCHITECTURE_FIELDS if k in model}
    if arch:
        model["backbone"] = {**as_backbone(model.get("backbone")).as_dict(), **arch}
    return MultimodalJEPA(image_size=image_size, n_ehr_features=n_ehr_features, **model)


def synthetic_batches(
    task: MultimodalJEPA, n: int, batch_size: int, seed: int = 0, device: str = "cpu"
) -> list[dict]:
    """``n`` batches of random volumes/EHR (15 % missing, half unlabelled) with the masks the
    task's own collator draws (all three JEPA modes occur, as in training)."""
    g = torch.Generator().manual_seed(seed)
    size = task.encoder.vit.img_size
    f = task.hparams.n_ehr_features
    collate = task.mask_collator()
    batches = []
    for _ in range(n):
        ehr = torch.randn(batch_size, f, generator=g)
        missing = torch.rand(batch_size, f, generator=g) < 0.15
        label = (torch.rand(batch_size, generator=g) < 0.5).float()
        label[torch.rand(batch_size, generator=g) < 0.5] = float("nan")
        batch = collate({
            "image": torch.randn(batch_size, 1, *size, generator=g),
            "ehr": ehr.masked_fill(missing, float("nan")),
            "ehr_missing": missing,
            "label": label,
        })  # fmt: skip
        batches.append(to_device(batch, device))
    return batches


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class PlainJEPALoop:
    """Plain PyTorch doing what Lightning's automatic optimisation does with the task.

    Per step: ``jepa_losses`` + online-probe loss (``training_step``'s sum, without its
    ``self.log`` calls), ``zero_grad(set_to_none)``, backward, AdamW step with the task's
    parameter groups, LR schedule step, then the EMA update with the momentum of the step
    just taken (what ``on_train_batch_end`` does).
    """

    def __init__(self, task: MultimodalJEPA, total_steps: int):
        self.task = task
        self.total = max(1, total_steps)
        groups = task.param_groups()
        for g in groups:
            g["lr"] = task.lr * g.pop("lr_mult", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=task.lr, betas=(0.9, 0.95))
        warmup = int(task.warmup_fraction * self.total)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, warmup, self.total, task.min_lr_ratio),
        )
        self.global_step = 0
        self._target = list(task.target_encoder.parameters())
        self._online = list(task.encoder.parameters())

    def step(self, batch: dict) -> torch.Tensor:
        task = self.task
        out = task.jepa_losses(batch)
        loss = out["loss"] + task.probe_loss(out, batch["label"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.global_step += 1
        h = task.hparams
        start = h.ema_momentum_start
        if start == "auto":
            start = ema_start_for_share(self.total, 0.05, 0.1, h.ema_momentum_end)
        m = ema_momentum(self.global_step - 1, self.total, start, h.ema_momentum_end)
        ema_update_(self._target, self._online, m)
        task.ema_init_share *= m
        return loss.detach()


def batch_loader(batches: list[dict]) -> DataLoader:
    """The prepared batches as a loader, in order, in-process (no worker noise)."""
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def plain_step_times(task: MultimodalJEPA, batches: list[dict]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step starts of a plain loop over ``batches``."""
    task.to(batches[0]["image"].device).train()
    loop = PlainJEPALoop(task, len(batches))
    stamps = []
    for batch in batch_loader(batches):
        stamps.append(Clock.now())
        loop.step(batch)
    stamps.append(Clock.now())
    return intervals(stamps)


class StepTimer(L.Callback):
    """Stamps each ``on_train_batch_start`` (and the end of training): Lightning's whole
    loop between two batches (fetch, hooks, logging, optimizer, EMA) lands in one interval."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(Clock.now())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(Clock.now())


def lightning_trainer(max_steps: int, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    """A Trainer as a user runs one, minus what writes files or the terminal."""
    return L.Trainer(
        max_steps=max_steps,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks or [],
        **kwargs,
    )


def lightning_step_times(
    task: MultimodalJEPA, batches: list[dict]
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between consecutive step starts of ``Trainer.fit``."""
    timer = StepTimer()
    trainer = lightning_trainer(len(batches), [timer])
    trainer.fit(task, train_dataloaders=batch_loader(batches))
    return intervals(timer.stamps)


def fresh(template: MultimodalJEPA) -> MultimodalJEPA:
    """An identical, independent copy (same initial weights for every run)."""
    return copy.deepcopy(template)
