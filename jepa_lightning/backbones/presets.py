"""Named encoder sizes, so a config says ``backbone: small`` instead of five numbers.

Why one object: every task builds the same :class:`MultimodalEncoder`, and a finetuning
run must use the architecture its checkpoint was trained with. With the five numbers kept
in one :class:`Backbone`, a YAML names a preset or overrides one field of it, the tasks
build their encoder from it, and ``init_from`` compares one resolved object.

The ViT sizes follow I-JEPA's naming (ViT-T/S/B/L with 16³ patches for 128³ volumes);
``micro`` is the CPU size of the quickstart (8³ patches of a 32³ volume).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from jepa_lightning.backbones.vit3d import as_size3

PresetName = Literal["micro", "tiny", "small", "base", "large"]

# (patch_size, embed_dim, depth, num_heads, mlp_ratio)
PRESETS: dict[str, dict[str, Any]] = {
    "micro": {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
    "tiny": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0},
    "small": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0},
    "base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "large": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
}

#: the architecture fields a checkpoint must agree on (``init_from``)
ARCHITECTURE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass(frozen=True)
class Backbone:
    """The shared encoder's architecture: a preset, with any field overridden.

    In a YAML: ``backbone: small``, or ``backbone: {preset: small, depth: 6}``; on the
    command line ``--model.init_args.backbone=small`` or
    ``--model.init_args.backbone.depth=6``. A field left ``None`` takes the preset's value.

    Args:
        preset: ``micro`` (8³ patches, width 96, 4 blocks, 4 heads), ``tiny`` (16³, 192,
            12, 3), ``small`` (16³, 384, 12, 6), ``base`` (16³, 768, 12, 12) or ``large``
            (16³, 1024, 24, 16); MLP ratio 4 in all.
        patch_size: voxels per patch edge, one int or (D, H, W).
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
    """

    preset: PresetName = "micro"
    patch_size: int | list[int] | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None

    def resolved(self) -> Backbone:
        """This backbone with every ``None`` field filled from its preset; checked."""
        if self.preset not in PRESETS:
            raise ValueError(
                f"backbone preset {self.preset!r} is not one of {sorted(PRESETS)}; name one, "
                "or give patch_size/embed_dim/depth/num_heads/mlp_ratio with a preset to start from"
            )
        values = {
            k: PRESETS[self.preset][k] if getattr(self, k) is None else getattr(self, k)
            for k in ARCHITECTURE_FIELDS
        }
        if values["embed_dim"] % values["num_heads"]:
            raise ValueError(
                f"backbone embed_dim {values['embed_dim']} is not divisible by num_heads "
                f"{values['num_heads']}"
            )
        if isinstance(values["patch_size"], (list, tuple)):
            values["patch_size"] = list(as_size3(values["patch_size"]))
        values["mlp_ratio"] = float(values["mlp_ratio"])
        return replace(self, **values)

    def architecture(self) -> dict[str, Any]:
        """The resolved fields that decide the weights' shapes and meaning, comparable across
        checkpoints (``8`` and ``[8, 8, 8]`` compare equal)."""
        arch = {k: getattr(self.resolved(), k) for k in ARCHITECTURE_FIELDS}
        arch["patch_size"] = list(as_size3(arch["patch_size"]))
        return arch

    def as_dict(self) -> dict[str, Any]:
        """Plain types only: what a checkpoint's hyperparameters store (a checkpoint read with
        ``weights_only=True`` cannot hold a dataclass)."""
        return asdict(self.resolved())


def as_backbone(value: str | Backbone | Mapping[str, Any] | None) -> Backbone:
    """Accept a preset name, a :class:`Backbone`, or its dict (from a checkpoint or YAML);
    return it resolved. Unknown keys in a dict are an error naming them."""
    if value is None:
        return Backbone().resolved()
    if isinstance(value, Backbone):
        return value.resolved()
    if isinstance(value, str):
        return Backbone(preset=value).resolved()  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        known = {f.name for f in fields(Backbone)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"backbone has unknown keys {unknown}; valid keys: {sorted(known)}")
        return Backbone(**dict(value)).resolved()
    raise TypeError(f"backbone must be a preset name, a Backbone or a dict, got {value!r}")
