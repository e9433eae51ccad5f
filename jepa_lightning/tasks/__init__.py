"""LightningModules. Each task builds on the shared backbones; none reads files of data."""

from jepa_lightning.tasks.base import BaseTask
from jepa_lightning.tasks.baselines import MAE, MSN, ImageEHRContrastive
from jepa_lightning.tasks.diagnosis import DiagnosisTask
from jepa_lightning.tasks.jepa import MultimodalJEPA

__all__ = ["MAE", "MSN", "BaseTask", "DiagnosisTask", "ImageEHRContrastive", "MultimodalJEPA"]
