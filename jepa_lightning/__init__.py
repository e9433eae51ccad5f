"""jepa-lightning: multimodal JEPA pretraining on CT + EHR, and few-label finetuning.

``jepa_lightning.load_encoder(ckpt)`` returns a checkpoint's encoder (a plain ``nn.Module``)
with the preprocessing and EHR normalisation it was trained with (imported on first use).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load_encoder", "PretrainedEncoder"):
        from jepa_lightning import encoder_export

        return getattr(encoder_export, name)
    raise AttributeError(f"module 'jepa_lightning' has no attribute {name!r}")
