"""The base of teacher-student methods: EMA targets of online modules (JEPA, MSN).

A subclass declares its (online, target) pairs in :meth:`MomentumSSLTask.momentum_pairs`
(solo-learn's ``momentum_pairs``); this class makes the targets (frozen deep copies, always
in eval mode), moves them once per real optimizer step along the momentum schedule, and
logs the momentum and the share of the random init still in the target.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
from torch import nn

from jepa_lightning.schedules import (
    ema_init_share,
    ema_momentum,
    ema_start_for_share,
    ema_update_,
)
from jepa_lightning.tasks.ssl import SSLTask

log = logging.getLogger(__name__)


def frozen_copy(module: nn.Module) -> nn.Module:
    """An EMA target of ``module``: same weights, no gradient."""
    return copy.deepcopy(module).requires_grad_(False)


class MomentumSSLTask(SSLTask):
    """An :class:`SSLTask` with EMA targets.

    Args:
        ema_momentum_start / ema_momentum_end: EMA momentum, linear over optimizer steps.
            ``auto`` picks the largest start (<= 0.996) that leaves < 5 % of the random init
            in the target after 10 % of the steps (0.996 suits 100k-step runs, not 1k);
            ``train/ema_init_share`` logs the share actually left.
        **kwargs: :class:`SSLTask`'s and :class:`BaseTask`'s arguments.
    """

    def __init__(
        self,
        ema_momentum_start: float | Literal["auto"] = "auto",
        ema_momentum_end: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.ema_momentum_start = ema_momentum_start
        self.ema_momentum_end = ema_momentum_end
        # Product of the EMA momenta so far: the share of the random init left in the target.
        self.register_buffer("ema_init_share", torch.ones((), dtype=torch.float64))
        self._last_ema_step = -1

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` module pairs the EMA moves; ``target_encoder`` first."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        for _, target in self.momentum_pairs():
            target.eval()  # a target never runs in training mode
        return self

    def ema_start(self) -> float:
        """The start momentum: the configured one, or the ``auto`` one for this run length."""
        start, end = self.ema_momentum_start, self.ema_momentum_end
        if start != "auto":
            return float(start)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if getattr(self, "_auto_ema", (None, None))[0] != total:
            self._auto_ema = (total, ema_start_for_share(total, 0.05, 0.1, end))
        return self._auto_ema[1]

    def momentum_at(self, step: int) -> float:
        """The EMA momentum of the update that follows optimizer step ``step`` (0-based)."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return ema_momentum(step, total, self.ema_start(), self.ema_momentum_end)

    def current_momentum(self) -> float:
        """The momentum of this step's update (``global_step`` counts the steps taken)."""
        return self.momentum_at(self.trainer.global_step)

    def extra_diagnostics(self) -> dict[str, torch.Tensor | float]:
        return {
            "ema_momentum": self.current_momentum(),
            "ema_init_share": float(self.ema_init_share),
            **super().extra_diagnostics(),
        }

    def on_train_start(self) -> None:
        self._last_ema_step = self.trainer.global_step  # also right after a resume
        total = max(1, int(self.trainer.estimated_stepping_batches))
        start = self.ema_start()
        share = ema_init_share(max(1, -(-total // 10)), total, start, self.ema_momentum_end)
        log.info(
            "EMA %.4g -> %.4g over %d steps: %.1f %% of the random init left in the target "
            "after 10 %% of the steps",
            start, self.ema_momentum_end, total, 100 * share,
        )  # fmt: skip
        if share > 0.05 + 1e-9:
            log.warning(
                "the EMA target keeps %.0f %% of its random init after 10 %% of the run; lower "
                "ema_momentum_start (the finetuning starts from the target encoder)",
                100 * share,
            )
        super().on_train_start()  # the random-init references

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per real optimizer step: with gradient accumulation global_step only moves
        # on the step that updated the weights. It has already moved past that step here,
        # so the step just taken is global_step - 1: reading global_step itself would run
        # the schedule one step late and make the last update a no-op (momentum 1).
        step = self.trainer.global_step
        if step == self._last_ema_step:
            return
        self._last_ema_step = step
        momentum = self.momentum_at(step - 1)
        for online, target in self.momentum_pairs():
            ema_update_(list(target.parameters()), list(online.parameters()), momentum)
        self.ema_init_share *= momentum
