"""What every task shares: the encoder's configuration, optimizer groups, a per-step warmup +
cosine schedule, LR scaling, and the DDP-safe helpers for evaluation decisions.

Every task takes these arguments through ``**kwargs`` (jsonargparse follows the
``super().__init__`` call, so the CLI and ``--print_config`` list them for each task): a
YAML writes them the same way for every method, and they are declared once, here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from torch import nn

from jepa_lightning.backbones import Backbone, MultimodalEncoder, as_backbone
from jepa_lightning.backbones.pooling import POOLINGS, PoolingName, pool_tokens
from jepa_lightning.backbones.presets import PresetName
from jepa_lightning.backbones.vit3d import compile_blocks
from jepa_lightning.distributed import all_reduce_sum
from jepa_lightning.lightning_internals import logger_writes_this_step
from jepa_lightning.losses import ReduceSum
from jepa_lightning.schedules import cosine_ramp, warmup_cosine, warmup_stable_decay

log = logging.getLogger(__name__)

# Parameters that are codes rather than weights: decaying them towards 0 only erases them
# (MSN's prototypes: the MSN paper excludes them from weight decay).
NO_DECAY_NAMES = (
    "prototypes",
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


class BaseTask(L.LightningModule):
    """A task on the shared multimodal encoder, trained by AdamW with decay groups and a
    warmup + cosine (or warmup-stable-decay) LR updated every optimizer step.

    Args:
        image_size: volume size (D, H, W); linked from the data module by the CLI.
        n_ehr_features: EHR vector length; linked from the data module by the CLI.
        backbone: the encoder's architecture, a preset name (``micro``, ``tiny``, ``small``,
            ``base``, ``large``) or a :class:`~jepa_lightning.backbones.Backbone` block with
            fields overridden (``{preset: small, depth: 6}``); a finetuning model must match
            the one its ``init_from`` checkpoint was trained with.
        grad_checkpointing: trade compute for activation memory in the encoders.
        compile: ``torch.compile`` the transformer blocks in ``configure_model``;
            checkpoints are unchanged.
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
        pooling: how a scan's tokens become the one feature vector that probes, the
            collapse monitors, finetuning heads and SIGReg read: ``mean`` (every token) or
            ``center`` (the ``pool_center_size``³ image tokens at the crop centre, where an
            ROI-centred crop puts the lesion, plus any EHR tokens;
            :mod:`~jepa_lightning.backbones.pooling`). ``center`` is for ROI-centred crops
            (a manifest with ``roi_x/y/z``); without an ROI keep ``mean``.
        pool_center_size: side, in patches, of the central block ``center`` pools.
    """

    def __init__(
        self,
        image_size: int | list[int] = 32,
        n_ehr_features: int = 32,
        backbone: Backbone | PresetName = "micro",
        grad_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        base_batch_size: int | None = None,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        weight_decay_end: float | None = None,
        pooling: PoolingName = "mean",
        pool_center_size: int = 2,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pool_center_size < 1:
            raise ValueError(f"pool_center_size must be >= 1, got {pool_center_size}")
        if lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={decay_fraction} must be in (0, 1]")
        # Collects this call's arguments and the subclass's (Lightning walks the __init__
        # frames), so every task's checkpoint records the backbone and the optimizer alike.
        self.save_hyperparameters()
        self.backbone = as_backbone(backbone)
        self.hparams["backbone"] = self.backbone.as_dict()  # plain types: weights_only loads
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        self.base_batch_size = base_batch_size
        self.lr_schedule = lr_schedule
        self.decay_fraction = decay_fraction
        self.weight_decay_end = weight_decay_end

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def pool(self, tokens: torch.Tensor, n_image: int | None = None) -> torch.Tensor:
        """``[B, N, C] -> [B, C]`` by this task's ``pooling``; ``n_image`` image tokens lead
        (default: all of them, an image-only sequence)."""
        n_image = tokens.shape[1] if n_image is None else n_image
        h = self.hparams
        return pool_tokens(
            tokens, n_image, self.encoder.grid, h.get("pooling", "mean"),
            h.get("pool_center_size", 2),
        )  # fmt: skip

    def build_encoder(self, residual_rescale: bool = False) -> MultimodalEncoder:
        """The shared encoder of this task's backbone and data sizes (every task builds its
        encoder here, so a pretrained state dict loads into a finetuning model key for key)."""
        h = self.hparams
        return MultimodalEncoder(
            image_size=h.image_size, n_ehr_features=h.n_ehr_features, backbone=self.backbone,
            grad_checkpointing=h.grad_checkpointing, residual_rescale=residual_rescale,
        )  # fmt: skip

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
        """Samples per optimizer step over all ranks, from the training loader the trainer
        built (``estimated_stepping_batches`` has built it by the time the optimizer is)."""
        t = self.trainer
        int(t.estimated_stepping_batches)  # makes the trainer set up its training loader
        per_device = getattr(t.train_dataloader, "batch_size", None)
        if per_device is None:
            return None
        return per_device * t.world_size * t.accumulate_grad_batches

    def peak_lr(self) -> float:
        if self.base_batch_size is None:
            return self.lr
        global_batch = self.global_batch_size()
        if global_batch is None:
            raise ValueError(
                "base_batch_size is set but the training loader has no fixed batch_size "
                "(a batch_sampler): set lr for the global batch and leave base_batch_size unset"
            )
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
        re-derived (:func:`~jepa_lightning.lightning_internals.logger_writes_this_step`);
        a test checks what a CSVLogger receives.
        """
        return logger_writes_this_step(self.trainer)

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

    # --- DDP: objectives of the global batch, and steps every rank takes -------------------
    def attached_trainer(self) -> L.Trainer | None:
        """The trainer, or None for a module used outside one (Lightning's ``trainer``
        property raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def world_size(self) -> int:
        return trainer.world_size if (trainer := self.attached_trainer()) else 1

    def loss_reduce_sum(self) -> ReduceSum | None:
        """What the losses sum their counts and statistics with: a differentiable sum over
        DDP ranks in training (so N ranks x B give the objective of 1 process x N·B,
        :mod:`jepa_lightning.distributed`), None on one process and in evaluation (ranks may
        hold different numbers of validation batches, so no collective may depend on them)."""
        return all_reduce_sum if self.world_size() > 1 and self.training else None

    def empty_batch(self) -> dict:
        """A batch of zero samples with the documented keys and shapes, for a DDP rank whose
        whole batch was skipped as bad input.

        Why: Lightning cannot skip a step on one rank only (``training_step`` returning None
        is refused under DDP), and the other ranks' losses wait in collectives this rank
        must join. With zero samples it runs the same code, adds nothing to any sum or count
        (every loss is a global mean, :meth:`loss_reduce_sum`), and :meth:`backward`'s zero
        term gives every parameter a gradient to all-reduce, so the step equals the one the
        other ranks' samples alone would give. A subclass adds its own keys (masks)."""
        h = self.hparams
        size = h.image_size if isinstance(h.image_size, list | tuple) else [h.image_size] * 3
        f = h.n_ehr_features
        return {
            "image": torch.zeros(0, 1, *size, device=self.device),
            "ehr": torch.zeros(0, f, device=self.device),
            "ehr_missing": torch.zeros(0, f, dtype=torch.bool, device=self.device),
            "label": torch.zeros(0, device=self.device),
            "patient_id": [],
            "scan_id": [],
            "cohort": [],
        }

    def training_batch(self, batch: dict) -> dict | None:
        """The batch a ``training_step`` trains on: ``batch``, or for a batch whose every
        sample was skipped, None on one process (Lightning skips the step) and
        :meth:`empty_batch` under DDP (every rank must take every step)."""
        if batch:
            return batch
        if self.world_size() == 1:
            return None
        if not getattr(self, "_warned_empty_rank", False):
            log.warning(
                "rank %d: every sample of a training batch was skipped as bad input; this rank "
                "steps with an empty batch (the others' samples make the step)",
                self.global_rank,
            )
            self._warned_empty_rank = True
        return self.empty_batch()

    # --- DDP: evaluation decisions every rank takes alike ----------------------------------
    def count_over_ranks(self, n: int | torch.Tensor) -> int:
        """``n`` summed over all ranks (``n`` itself on one device).

        Evaluation hooks use it to decide whether a metric has anything to compute: a
        rank-local check (``metric.update_count``) would let a rank that saw no labelled scan
        skip the ``compute()`` whose all-gather the other ranks wait in.
        """
        total = torch.as_tensor(n, dtype=torch.float32, device=self.device)
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            total = trainer.strategy.reduce(total.clone(), reduce_op="sum")
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

    # --- the data contract (jepa_lightning/data_contract.py) --------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """Every task brings :class:`~jepa_lightning.callbacks.DataContract`: it checks the
        first batch against the documented keys and installs the task's per-batch extras
        (JEPA's masks, ``collate_hook()``), so a ``Trainer`` built by hand needs nothing more."""
        from jepa_lightning.callbacks import DataContract

        return [DataContract()]

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
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            touched = [p.reshape(-1)[:1] for p in self.parameters() if p.requires_grad]
            if touched:
                loss = loss + 0.0 * torch.cat(touched).sum().to(loss.dtype)
        super().backward(loss, *args, **kwargs)
