"""LightningModules. Each task builds on the shared backbones; none reads files of data.

``BaseTask`` (encoder + optimizer arguments) <- ``SSLTask`` (online probes, collapse
monitors, references) <- ``MomentumSSLTask`` (EMA targets) <- ``MultimodalJEPA`` (<-
``TemporalJEPA``, across time; <- ``JEPAContrastive``, the JEPA plus CLIP's InfoNCE), ``MSN``;
``SSLTask`` <- ``MAE``, ``ImageEHRContrastive``; ``BaseTask`` <- ``DiagnosisTask`` <-
``LongitudinalDiagnosisTask`` (a patient's scans over time).
"""

from jepa_lightning.tasks.base import BaseTask
from jepa_lightning.tasks.baselines import MAE, MSN, ImageEHRContrastive
from jepa_lightning.tasks.diagnosis import DiagnosisTask
from jepa_lightning.tasks.jepa import MultimodalJEPA
from jepa_lightning.tasks.jepa_contrastive import JEPAContrastive
from jepa_lightning.tasks.longitudinal import LongitudinalDiagnosisTask
from jepa_lightning.tasks.momentum import MomentumSSLTask
from jepa_lightning.tasks.ssl import SSLTask
from jepa_lightning.tasks.temporal_jepa import TemporalJEPA

__all__ = [
    "MAE",
    "MSN",
    "BaseTask",
    "DiagnosisTask",
    "ImageEHRContrastive",
    "JEPAContrastive",
    "LongitudinalDiagnosisTask",
    "MomentumSSLTask",
    "MultimodalJEPA",
    "SSLTask",
    "TemporalJEPA",
]
