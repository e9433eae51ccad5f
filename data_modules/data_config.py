"""The ``data:`` block of training configs, outside the training CLI.

Why: whatever trained must be embeddable (issue 24). ``python -m jepa_lightning.embed``
used to rebuild a ``CTEHRDataModule`` from the manifest alone, so an archive whose EHR
comes from an ``ehr_table`` (or any other data setting) could not be read as it was in
training. :func:`datamodule_from_configs` takes the same YAML files as ``fit --config`` and
builds the data module their ``data:`` blocks describe, merged in order as LightningCLI
merges them (a later file's keys win; a ``class_path`` change keeps the init args the new
class accepts). Keys other than ``data`` (model, trainer) are ignored.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import yaml


class DataConfigError(ValueError):
    """A config file without a usable ``data:`` block; the message names the file."""


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def data_block(paths: list[str | Path]) -> dict[str, Any]:
    """The merged ``data:`` block (``class_path`` + ``init_args``) of ``paths``, in order."""
    block: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise DataConfigError(f"config {path} does not exist")
        content = yaml.safe_load(path.read_text()) or {}
        data = content.get("data") if isinstance(content, dict) else None
        if data is None:
            continue
        if not isinstance(data, dict) or ("class_path" not in data and "init_args" not in data):
            raise DataConfigError(
                f"config {path}: 'data:' must hold class_path and init_args, as in training "
                "configs (data_modules/README.md, '2. Train')"
            )
        if "class_path" in data and data["class_path"] != block.get("class_path"):
            block["class_path"] = data["class_path"]
        block["init_args"] = _merge(block.get("init_args", {}), data.get("init_args") or {})
    if "class_path" not in block:
        raise DataConfigError(
            f"none of {[str(p) for p in paths]} has a data: block with a class_path; pass the "
            "data config you trained with (e.g. --config my_data.yaml)"
        )
    return block


def _accepted(cls: type, init_args: dict[str, Any]) -> dict[str, Any]:
    """The init args ``cls`` (or, through ``**kwargs``, ``CTEHRDataModule``) accepts."""
    from data_modules.ct_ehr import CTEHRDataModule

    params = inspect.signature(cls.__init__).parameters
    names = set(params)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names |= set(inspect.signature(CTEHRDataModule.__init__).parameters)
    return {k: v for k, v in init_args.items() if k in names}


def resolve_class(class_path: str) -> type:
    """``class_path`` as LightningCLI reads it: a dotted path, or the name of an imported
    ``LightningDataModule`` subclass (``CTEHRDataModule``)."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(__import__(module, fromlist=[name]), name)
    todo, seen = [L.LightningDataModule], {}
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            seen.setdefault(sub.__name__, sub)
            todo.append(sub)
    if class_path not in seen:
        raise DataConfigError(f"data class_path {class_path!r} is not a known data module")
    return seen[class_path]


def datamodule_from_configs(paths: list[str | Path], **overrides: Any) -> L.LightningDataModule:
    """The data module the ``data:`` blocks of ``paths`` describe, with ``overrides`` set on
    its init args (e.g. ``batch_size``), built by jsonargparse as LightningCLI builds it."""
    import jsonargparse

    import data_modules  # noqa: F401  (registers the cohort data modules for short class names)
    from data_modules.lidc.datamodule import LIDCCohortDataModule  # noqa: F401
    from data_modules.synthetic.datamodule import SyntheticCohortDataModule  # noqa: F401

    block = data_block(paths)
    block["init_args"] = _merge(block.get("init_args", {}), overrides)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    try:
        block["init_args"] = _accepted(resolve_class(block["class_path"]), block["init_args"])
        cfg = parser.parse_object({"data": block})
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else None
        if init is None:
            init = parser.instantiate_classes(cfg)
    except Exception as err:
        raise DataConfigError(f"data block of {[str(p) for p in paths]}: {err}") from err
    return init.data
