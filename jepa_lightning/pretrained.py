"""Reading a pretrained encoder out of a checkpoint: which weights, which architecture, which
data state. The one place that does it, for finetuning (``DiagnosisTask(init_from=...)``),
``load_encoder`` / ``embed`` and the encoder inspection figures.

A checkpoint records the task's hyperparameters. Its architecture is ``image_size``,
``n_ehr_features`` and the resolved ``backbone`` block (checkpoints written before the
backbone became one block record its five fields at the top level; both are read).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from jepa_lightning.backbones import MultimodalEncoder, as_backbone
from jepa_lightning.backbones.presets import ARCHITECTURE_FIELDS
from jepa_lightning.backbones.vit3d import as_size3
from jepa_lightning.checkpoints import CheckpointMismatchError, read_checkpoint

log = logging.getLogger(__name__)

# Which encoder of a pretraining checkpoint to take.
ENCODER_PREFIXES = {
    "auto": ("target_encoder.", "encoder."),  # the EMA target when the method has one
    "target": ("target_encoder.",),
    "context": ("encoder.",),
}

# Where a differing architecture field is set, for the error's hint.
LINKED_FROM_DATA = {
    "image_size": "data.init_args.image_size",
    "n_ehr_features": "the data's EHR columns",
}


def architecture(image_size: int | list[int], n_ehr_features: int, backbone: Any) -> dict[str, Any]:
    """What must agree between a checkpoint's encoder and the model it initialises."""
    return {
        "image_size": list(as_size3(image_size)),
        "n_ehr_features": int(n_ehr_features),
        **as_backbone(backbone).architecture(),
    }


def checkpoint_architecture(hparams: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The architecture a checkpoint's hyperparameters record (either layout), or an error
    naming what is missing."""
    if "backbone" in hparams:
        backbone = hparams["backbone"]
        absent = [k for k in ("image_size", "n_ehr_features") if k not in hparams]
    else:  # the five fields at the top level
        backbone = {k: hparams[k] for k in ARCHITECTURE_FIELDS if k in hparams}
        need = ("image_size", "n_ehr_features", *ARCHITECTURE_FIELDS)
        absent = [k for k in need if k not in hparams]
    if absent:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not record the backbone hyperparameters {absent}, so it "
            "cannot be checked against this model; use a checkpoint written by this framework"
        )
    return architecture(hparams["image_size"], hparams["n_ehr_features"], backbone)


def read_pretraining_checkpoint(path: str | Path, role: str) -> dict[str, Any]:
    ckpt = read_checkpoint(path, role)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def encoder_weights(
    ckpt: dict[str, Any], path: str | Path, encoder: str = "auto"
) -> tuple[dict[str, torch.Tensor], str]:
    """The chosen encoder's weights (keys without their prefix) and the prefix's module name.

    ``encoder``: ``auto`` takes the EMA target encoder where there is one (JEPA, MSN) and
    the encoder otherwise (MAE, CLIP, DiagnosisTask); ``target`` / ``context`` insist."""
    if encoder not in ENCODER_PREFIXES:
        raise ValueError(f"encoder must be one of {list(ENCODER_PREFIXES)}, got {encoder!r}")
    sd = ckpt["state_dict"]
    for prefix in ENCODER_PREFIXES[encoder]:
        weights = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if weights:
            return weights, prefix.rstrip(".")
    heads = sorted({k.split(".")[0] for k in sd})
    if encoder == "target" and "encoder" in heads:
        raise CheckpointMismatchError(
            f"checkpoint {path} has no EMA target encoder ('target_encoder.*'; top-level "
            f"modules: {heads}): its method has none (MAE, CLIP, supervised); set "
            "init_from_encoder: context (or auto)"
        )
    raise CheckpointMismatchError(
        f"checkpoint {path} has no encoder weights (no "
        f"{' or '.join(repr(p + '*') for p in ENCODER_PREFIXES[encoder])} keys; top-level "
        f"modules: {heads}); expected a checkpoint of a jepa-lightning pretraining task "
        "(MultimodalJEPA, MAE, MSN, ImageEHRContrastive) or DiagnosisTask"
    )


def data_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The data module state the checkpoint was trained with (EHR normalisation,
    preprocessing), or None."""
    return next((v for v in ckpt.values() if isinstance(v, dict) and "ehr_stats" in v), None)


def load_pretrained_encoder(
    path: str | Path, expected: dict[str, Any], encoder: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The encoder weights of a checkpoint and the data state it was trained with; refuses,
    naming the differing fields and where to set them, a checkpoint whose architecture
    differs from ``expected`` (an :func:`architecture` dict)."""
    ckpt = read_pretraining_checkpoint(path, "init_from checkpoint")
    found = checkpoint_architecture(ckpt.get("hyper_parameters", {}), path)
    differing = {k: (found[k], expected[k]) for k in expected if found.get(k) != expected[k]}
    if differing:
        hint = " ".join(
            f"{LINKED_FROM_DATA[k]}={v[0]}"
            if k in LINKED_FROM_DATA
            else f"--model.init_args.backbone.{k}={v[0]}"
            for k, v in differing.items()
        )
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained with a different backbone "
            f"(checkpoint vs this model: {differing}); set {hint}"
        )
    weights, source = encoder_weights(ckpt, path, encoder)
    log.info(
        "init_from %s: loaded %d tensors of its %s (%s, trained %s steps)",
        path, len(weights), source, ckpt.get("hyper_parameters", {}).get("_class_path", "a task"),
        ckpt.get("global_step", "?"),
    )  # fmt: skip
    return weights, data_state(ckpt)


def encoder_from_checkpoint(
    path: str | Path, encoder: str = "auto", role: str = "checkpoint"
) -> tuple[MultimodalEncoder, dict[str, Any], dict[str, Any], str]:
    """A checkpoint's encoder as a plain module (loaded strictly, eval mode, CPU), its
    hyperparameters, its data state (``{}`` when none) and the weights' source module."""
    ckpt = read_pretraining_checkpoint(path, role)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    arch = checkpoint_architecture(hparams, path)
    module = MultimodalEncoder(
        image_size=arch["image_size"],
        n_ehr_features=arch["n_ehr_features"],
        backbone={k: arch[k] for k in ARCHITECTURE_FIELDS},
    )
    weights, source = encoder_weights(ckpt, path, encoder)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit its encoder: {err}") from err
    return module.eval(), hparams, data_state(ckpt) or {}, source
