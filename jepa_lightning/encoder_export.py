"""Taking the pretrained encoder away: :func:`load_encoder` and ``python -m
jepa_lightning.embed`` (issue 14, case 9).

A pretraining checkpoint (MultimodalJEPA, MAE, MSN, ImageEHRContrastive) or a DiagnosisTask
checkpoint holds the encoder weights, its hyperparameters and, from ``CTEHRDataModule``, the
EHR normalisation and the CT preprocessing it was trained with. :func:`load_encoder` returns
all three with the plain ``nn.Module``, so the encoder works in the user's own code the way
it worked in training; :meth:`PretrainedEncoder.embed` is exactly ``DiagnosisTask.features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jepa_lightning.pretrained import encoder_from_checkpoint


@dataclass
class PretrainedEncoder:
    """What :func:`load_encoder` returns.

    Attributes:
        encoder: the ``MultimodalEncoder`` (plain ``nn.Module``, eval mode, CPU), taking
            ``image [B, 1, D, H, W]`` in [0, 1] after ``preprocessing``, ``ehr [B, F]``
            normalised with ``ehr_normalisation`` (NaN = missing) and ``ehr_missing``.
        hparams: the task's hyperparameters (backbone sizes, image_size, ...).
        preprocessing: ``{"image_size", "hu_window", "preprocess"}`` as trained (None for
            checkpoints written before it was saved, or from the synthetic data module).
        ehr_normalisation: ``{"columns", "mean", "std"}`` fitted on the training split.
        source: which weights were loaded (``target_encoder`` or ``encoder``).
    """

    encoder: nn.Module
    hparams: dict[str, Any]
    preprocessing: dict[str, Any] | None
    ehr_normalisation: dict[str, Any] | None
    source: str

    @torch.no_grad()
    def embed(
        self,
        image: torch.Tensor | None,
        ehr: torch.Tensor | None = None,
        ehr_missing: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled encoder tokens ``[B, C]`` of the given modalities (as finetuning and
        ``DiagnosisTask.predict`` compute them)."""
        if ehr is not None and ehr_missing is None:
            ehr_missing = torch.isnan(ehr)
        return self.encoder(image, ehr, ehr_missing).mean(1)

    def normalise_ehr(self, values: torch.Tensor) -> torch.Tensor:
        """Raw EHR values ``[B, F]`` (columns ``ehr_normalisation['columns']``) -> z-scores."""
        if self.ehr_normalisation is None:
            raise ValueError("this checkpoint carries no EHR normalisation")
        mean = torch.tensor(self.ehr_normalisation["mean"], dtype=values.dtype)
        std = torch.tensor(self.ehr_normalisation["std"], dtype=values.dtype)
        return (values - mean) / std


def load_encoder(path: str | Path, encoder: str = "auto") -> PretrainedEncoder:
    """The encoder of a jepa-lightning checkpoint, with its preprocessing and EHR statistics.

    ``encoder``: ``auto`` (the EMA target encoder where the method has one, JEPA and MSN,
    else the encoder), ``target`` or ``context``. Loading is strict."""
    module, hparams, data, source = encoder_from_checkpoint(
        path, encoder, "load_encoder checkpoint"
    )
    return PretrainedEncoder(
        encoder=module,
        hparams=hparams,
        preprocessing=data.get("preprocessing"),
        ehr_normalisation=data.get("ehr_stats"),
        source=source,
    )
