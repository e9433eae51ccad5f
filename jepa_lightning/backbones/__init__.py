"""Plain nn.Modules shared by every task. No Lightning, no files."""

from jepa_lightning.backbones.ehr import EHRTokenizer
from jepa_lightning.backbones.multimodal_encoder import MultimodalEncoder
from jepa_lightning.backbones.predictor import JEPAPredictor
from jepa_lightning.backbones.presets import PRESETS, Backbone, as_backbone
from jepa_lightning.backbones.temporal import TemporalEncoder, TimeEmbedding
from jepa_lightning.backbones.vit3d import VisionTransformer3D

__all__ = [
    "PRESETS",
    "Backbone",
    "as_backbone",
    "EHRTokenizer",
    "JEPAPredictor",
    "MultimodalEncoder",
    "TemporalEncoder",
    "TimeEmbedding",
    "VisionTransformer3D",
]
