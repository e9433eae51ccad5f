"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def _numpy_state() -> tuple:
    """NumPy's global state in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (
        str(name),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    )


class RNGStateCheckpoint(L.Callback):
    """Saves the process's random streams (torch CPU, CUDA, NumPy, Python) in every checkpoint
    and restores them on resume, so a run resumed with ``--ckpt_path`` draws the same shuffles,
    dropout and augmentation as the uninterrupted run from the checkpointed step on (Lightning
    re-seeds at start-up but does not restore streams). The JEPA mask stream travels with the
    data module's state. Exact for checkpoints taken at epoch ends with ``num_workers: 0``;
    loader workers keep streams of their own. Under DDP rank 0's streams are saved; every rank
    is seeded alike anyway, and the mask streams stay distinct per rank.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
