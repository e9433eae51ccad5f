"""jepa-lightning: multimodal JEPA pretraining on CT + EHR, and few-label finetuning."""

__version__ = "0.1.0"
