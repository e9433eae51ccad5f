"""What every task shares: optimizer groups, a per-step warmup + cosine schedule, LR scaling."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from torch import nn

from jepa_lightning.backbones.vit3d import compile_blocks
from jepa_lightning.schedules import cosine_ramp, warmup_cosine, warmup_stable_decay

log = logging.getLogger(__name__)

# Parameters that are codes rather than weights: decaying them towards 0 only erases them.
NO_DECAY_NAMES = (
    "identity",
    "ehr_identity",
    "missing_embed",
    "modality_embed",
    "mask_token",
    "value_bias",
)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases (any 1-D tensor) and embedding codes get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES


def decay_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_mult: float = 1.0
) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": lr_mult, "decayed": True},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": lr_mult, "decayed": False},
    ]
    return [g for g in groups if g["params"]]


class SyncedStandardize(nn.Module):
    """Per-feature standardisation with batch statistics summed over all DDP ranks, and
    running statistics for evaluation (a batch norm without affine parameters).

    Why not ``nn.BatchNorm1d``: each rank would update its running statistics from its own
    batch, so after training the replicas (and the checkpoints each rank would write) differ
    and each rank evaluates its probe with a different normalisation. ``nn.SyncBatchNorm``
    runs on GPUs only. The input is detached (probe features), so the statistics need no
    gradient. In training every rank takes part in the one all-reduce per call (a rank with
    fewer than two samples contributes what it has); a global batch of fewer than two uses
    the running statistics.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @staticmethod
    def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, biased variance and sample count over the global batch, two passes (see
        losses); all tensors, so a GPU step waits on no host round trip."""
        x = x.detach().float()
        total = self._sum_over_ranks(torch.cat([x.sum(0), x.new_full((1,), float(len(x)))]))
        n = total[-1]
        mean = total[:-1] / n.clamp(min=1)
        squares = self._sum_over_ranks(((x - mean) ** 2).sum(0))
        return mean, squares / n.clamp(min=1), n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.running_mean, self.running_var
        if self.training:
            batch_mean, batch_var, n = self._batch_moments(x)
            enough = n >= 2  # a global batch of one keeps (and uses) the running statistics
            with torch.no_grad():
                m = self.momentum
                unbiased = batch_var * n / (n - 1).clamp(min=1)
                new_mean = (1 - m) * self.running_mean + m * batch_mean
                new_var = (1 - m) * self.running_var + m * unbiased
                mean = torch.where(enough, batch_mean, self.running_mean).clone()
                var = torch.where(enough, batch_var, self.running_var).clone()
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
                self.num_batches_tracked += enough.long()
        return (x - mean.to(x.dtype)) / torch.sqrt(var.to(x.dtype) + self.eps)


class OnlineProbe(nn.Module):
    """Linear probe on standardised features: :class:`SyncedStandardize`, then a linear layer.

    Why: the online probe is fitted by SGD beside the encoder, whose feature scale moves
    (a standardised SIGReg leaves it free; at random init the pooled std is ~0.006). On
    raw features the probe's AUROC then tracks the scale, not the content; standardised,
    it tracks what is linearly there (MAE's linear probe does the same).
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.norm = SyncedStandardize(in_features)
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class BaseTask(L.LightningModule):
    """AdamW with decay groups and a warmup + cosine (or warmup-stable-decay) LR updated every
    optimizer step.

    Args:
        lr: peak learning rate (per ``base_batch_size`` samples when that is set).
        weight_decay: AdamW decoupled weight decay on weight matrices only.
        warmup_fraction: share of all optimizer steps spent in linear warmup.
        min_lr_ratio: final LR as a fraction of the peak.
        base_batch_size: when set, the peak LR is ``lr * global_batch / base_batch_size``
            (global batch = per-device batch x devices x nodes x accumulation).
        lr_schedule: ``cosine`` (warmup then cosine) or ``wsd`` (warmup, flat, then a linear
            decay over the last ``decay_fraction`` of the steps; V-JEPA 2).
        decay_fraction: length of the ``wsd`` decay phase as a share of all steps.
        weight_decay_end: when set, the weight decay follows a half cosine from
            ``weight_decay`` to this value over the run (I-JEPA: 0.04 -> 0.4).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        base_batch_size: int | None = None,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        weight_decay_end: float | None = None,
    ):
        super().__init__()
        if lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={decay_fraction} must be in (0, 1]")
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        self.base_batch_size = base_batch_size
        self.lr_schedule = lr_schedule
        self.decay_fraction = decay_fraction
        self.weight_decay_end = weight_decay_end

    def configure_model(self) -> None:
        """``compile: true`` on a task compiles its transformer blocks here (once, before the
        optimizer is built; Lightning calls this hook in fit/validate/test/predict)."""
        if self.hparams.get("compile", False) and not getattr(self, "_blocks_compiled", False):
            n = compile_blocks(self)
            self._blocks_compiled = True
            log.info("torch.compile: %d transformer blocks", n)

    def param_groups(self) -> list[dict]:
        """Override to give parts of the model their own LR multiplier."""
        return decay_groups(self.named_parameters(), self.weight_decay)

    def global_batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None)
        if per_device is None:
            return None
        t = self.trainer
        return per_device * t.world_size * t.accumulate_grad_batches

    def peak_lr(self) -> float:
        if self.base_batch_size is None:
            return self.lr
        global_batch = self.global_batch_size()
        if global_batch is None:
            raise ValueError("base_batch_size is set but the data module exposes no batch_size")
        return self.lr * global_batch / self.base_batch_size

    def configure_optimizers(self):
        groups = self.param_groups()
        if not groups:
            raise ValueError("no trainable parameter: unfreeze something or add a head")
        peak = self.peak_lr()
        for g in groups:
            g["lr"] = peak * g.pop("lr_mult", 1.0)
        optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_fraction * total)
        log.info(
            "optimizer: peak lr %.3g, %s schedule, %d steps (%d warmup)",
            peak, self.lr_schedule, total, warmup,
        )  # fmt: skip
        if self.lr_schedule == "wsd":
            decay, ratio = self.decay_fraction, self.min_lr_ratio

            def multiplier(step: int) -> float:
                return warmup_stable_decay(step, warmup, total, decay, ratio)
        else:

            def multiplier(step: int) -> float:
                return warmup_cosine(step, warmup, total, self.min_lr_ratio)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def current_weight_decay(self) -> float:
        """The weight decay of this optimizer step (constant unless ``weight_decay_end``)."""
        if self.weight_decay_end is None:
            return self.weight_decay
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_ramp(
            self.trainer.global_step, total, self.weight_decay, self.weight_decay_end
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Apply the weight-decay schedule to the decayed groups before the step."""
        if self.weight_decay_end is None:
            return
        wd = self.current_weight_decay()
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("decayed", group["weight_decay"] > 0):
                    group["weight_decay"] = wd

    # --- step-level diagnostics, only on the steps the logger writes -----------------------
    def is_logger_step(self) -> bool:
        """Whether values logged in this ``training_step`` reach the logger.

        Lightning writes ``on_step`` values every ``log_every_n_steps`` optimizer steps (and
        when the run is stopping) and drops the others. Its own decision is asked for, not
        re-derived: after a mid-epoch resume its step counter and ``global_step`` can
        differ. It is a private attribute, so if a Lightning release renames it we fall
        back to logging every step (slower, never wrong); a test checks what a CSVLogger
        receives either way.
        """
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def log_train_diagnostics(
        self, values: dict[str, torch.Tensor | float], batch_size: int
    ) -> None:
        """Log ``train/<name>`` for each value, but only on steps the logger writes.

        Why: each ``self.log`` costs Python time on the step (Lightning re-homes its result
        metric on every call), and an ``on_step`` value logged between two logger writes is
        discarded. The six JEPA diagnostics cost ~2.5 % of the quickstart CPU step when
        logged every step (``experiments/benchmarks/lightning_overhead.py``). ``train/loss``
        is logged by the caller every step, for the progress bar.
        """
        if not self.is_logger_step():
            return
        for name, value in values.items():
            self.log(f"train/{name}", value, batch_size=batch_size)

    # --- DDP: evaluation decisions every rank takes alike ----------------------------------
    def count_over_ranks(self, n: int | torch.Tensor) -> int:
        """``n`` summed over all ranks (``n`` itself on one device).

        Evaluation hooks use it to decide whether a metric has anything to compute: a
        rank-local check (``metric.update_count``) would let a rank that saw no labelled scan
        skip the ``compute()`` whose all-gather the other ranks wait in.
        """
        total = torch.as_tensor(n, dtype=torch.float32, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total.clone(), reduce_op="sum")
        return int(total.item())

    def count_probe_labels(self, labels: torch.Tensor) -> None:
        """Add a validation batch's labelled scans (``labels`` without NaN) to the epoch's
        positive / negative counts that :meth:`log_probe_auroc` checks."""
        counts = getattr(self, "_probe_label_counts", [0, 0])
        positives = int((labels > 0.5).sum())
        self._probe_label_counts = [counts[0] + positives, counts[1] + len(labels) - positives]

    def log_probe_auroc(self, name: str, metric, **log_kwargs) -> None:
        """Log ``metric.compute()`` as ``name``, or NaN with a warning when the epoch's labelled
        validation scans (over all ranks) hold only one class.

        Why: torchmetrics returns 0.0 for a one-class AUROC, which reads as a broken model
        (and a checkpoint monitor would rank it); the AUROC is undefined there. NaN is never
        picked as best by ``ModelCheckpoint``. Every rank takes the same branch (global
        counts), so all or none enter ``compute()``'s all-gather."""
        positives, negatives = getattr(self, "_probe_label_counts", [0, 0])
        positives, negatives = self.count_over_ranks(positives), self.count_over_ranks(negatives)
        if not positives + negatives:
            return
        if positives and negatives:
            value = metric.compute()
        else:
            value = torch.tensor(float("nan"), device=self.device)
            if not getattr(self, "_warned_one_class", False):
                log.warning(
                    "%s: the %d labelled validation scans are all %s, so the AUROC is "
                    "undefined and logged as NaN; label scans of both classes in the "
                    "validation split (or a larger labelled fraction)",
                    name, positives + negatives, "positive" if positives else "negative",
                )  # fmt: skip
                self._warned_one_class = True
        self.log(name, value, sync_dist=True, **log_kwargs)

    def reset_probe_label_counts(self) -> None:
        self._probe_label_counts = [0, 0]

    # --- DDP: every trainable parameter takes part in every step ---------------------------
    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Under DDP, add a zero-weighted term touching every trainable parameter.

        Modality drop (and single-modality finetuning) leave some parameters out of a step's
        graph; plain ``strategy=ddp`` (``find_unused_parameters=False``) then waits for their
        gradients forever or fails at the next step. The zero term gives each of them a zero
        gradient, so the all-reduce averages it with the ranks that did use them. On one
        device nothing changes (the term is not added), so single-device runs stay
        bit-identical to before. Frozen parameters (``requires_grad=False``) are left out, as
        DDP leaves them out.
        """
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            touched = [p.reshape(-1)[:1] for p in self.parameters() if p.requires_grad]
            if touched:
                loss = loss + 0.0 * torch.cat(touched).sum().to(loss.dtype)
        super().backward(loss, *args, **kwargs)
