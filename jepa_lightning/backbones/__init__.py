"""Plain nn.Modules shared by every task. No Lightning, no files."""

from jepa_lightning.backbones.ehr import EHRTokenizer
from jepa_lightning.backbones.fusion import MultimodalEncoder
from jepa_lightning.backbones.predictor import JEPAPredictor
from jepa_lightning.backbones.vit3d import VisionTransformer3D

__all__ = ["EHRTokenizer", "JEPAPredictor", "MultimodalEncoder", "VisionTransformer3D"]
