"""Baseline pretraining methods on the shared backbones: MAE, MSN (+EHR), image-EHR CLIP."""

from jepa_lightning.tasks.baselines.contrastive import ImageEHRContrastive
from jepa_lightning.tasks.baselines.mae import MAE
from jepa_lightning.tasks.baselines.msn import MSN

__all__ = ["MAE", "MSN", "ImageEHRContrastive"]
