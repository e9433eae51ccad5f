"""The study YAML: which methods, protocols, label fractions and subsets to run, checked
up front so a typo fails before hours of training, with the offending key named.

```yaml
name: quick
out: runs/study-quick                 # every run, marker, table and plot goes here
common_args: [--trainer.enable_progress_bar=false]   # appended to every CLI run
label_fractions: [0.1, 1.0]           # of the labelled training patients
subsets: [0, 1]                       # label_subset_seed (also seed_everything) per run
reference: {method: supervised_multimodal, protocol: scratch}   # paired p-values vs this
comparisons:                          # extra pairs: Delta = model - against, CI, p (comparisons.md)
  - {model: {method: jepa, protocol: finetune}, against: {method: jepa, protocol: linear_probe}}
bootstrap: {n_resamples: 1000, seed: 0, level: 0.95}
tsne: {label_fraction: 1.0}           # which runs' embeddings the t-SNE shows (default: largest)
protocols:
  linear_probe: {configs: [experiments/quickstart/finetune.yaml],
                 args: [--model.init_args.freeze_backbone=true], pretrained: true}
  scratch:      {configs: [experiments/quickstart/finetune.yaml], pretrained: false}
methods:
  jepa:
    pretrain: experiments/quickstart/pretrain.yaml    # a `fit` config; its checkpoint is init_from
    pretrain_args: [--trainer.max_epochs=20]
    pretrain_checkpoint: best   # best by the config's monitor (else last), or last
    protocols: [linear_probe, finetune]
  supervised_image:
    configs: []                                       # downstream configs before the protocol's
    args: [--model.init_args.modalities=image]
    protocols: [scratch]
```

A run is ``fit --config <method configs> --config <protocol configs> <common_args>
<method args> <protocol args> --data.init_args.label_fraction=F
--data.init_args.label_subset_seed=S --seed_everything=S`` (+ ``init_from`` = the method's
pretraining checkpoint when the protocol is ``pretrained``). Paths are relative to the
current directory, as with ``--config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml


class StudyConfigError(ValueError):
    """The study YAML is malformed; the message names the file and key."""


@dataclass(frozen=True)
class Protocol:
    name: str
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    pretrained: bool = True


@dataclass(frozen=True)
class Method:
    name: str
    pretrain: str | None = None
    pretrain_args: tuple[str, ...] = ()
    pretrain_checkpoint: str = "best"
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    """One downstream run of the grid."""

    method: str
    protocol: str
    label_fraction: float
    subset: int

    @property
    def run_id(self) -> str:
        return f"{self.method}__{self.protocol}__f{self.label_fraction:g}__s{self.subset}"


@dataclass
class Study:
    name: str
    out: Path
    methods: dict[str, Method]
    protocols: dict[str, Protocol]
    label_fractions: list[float]
    subsets: list[int]
    common_args: list[str] = field(default_factory=list)
    reference: tuple[str, str] | None = None
    comparisons: list[tuple[tuple[str, str], tuple[str, str]]] = field(default_factory=list)
    n_resamples: int = 1000
    bootstrap_seed: int = 0
    level: float = 0.95
    tsne_fraction: float | None = None
    source: str = "<study>"
    # Where the pretrainings go and the arguments they take in place of ``common_args``.
    # The synthetic study sets both so scenarios that share one training archive (they differ
    # only in labels or the external site) share one pretraining; a plain study leaves them.
    pretrain_root: Path | None = None
    pretrain_common_args: list[str] | None = None

    def models(self) -> list[tuple[str, str]]:
        """Every (method, protocol) the study trains, in the YAML's order."""
        return [(m.name, p) for m in self.methods.values() for p in m.protocols]

    def runs(self) -> list[Run]:
        """The grid, method by method (so a method's pretraining is used right away)."""
        return [
            Run(m.name, p, f, s)
            for m in self.methods.values()
            for p in m.protocols
            for f in self.label_fractions
            for s in self.subsets
        ]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_KEYS = {
    "name", "out", "methods", "protocols", "label_fractions", "subsets", "common_args",
    "reference", "comparisons", "bootstrap", "tsne",
}  # fmt: skip
METHOD_KEYS = {"pretrain", "pretrain_args", "pretrain_checkpoint", "configs", "args", "protocols"}
PROTOCOL_KEYS = {"configs", "args", "pretrained"}
BOOTSTRAP_KEYS = {"n_resamples", "seed", "level"}


def _check_keys(where: str, got: dict, allowed: set[str], source: str) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise StudyConfigError(
            f"{source}: unknown key {where + '.' if where else ''}{unknown[0]} "
            f"(allowed under {where or 'the top level'}: {sorted(allowed)})"
        )


def _str_list(value: Any, key: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


def _config_paths(value: Any, key: str, source: str) -> tuple[str, ...]:
    paths = _str_list(value, key, source)
    for p in paths:
        if not Path(p).is_file():
            raise StudyConfigError(
                f"{source}: {key} names {p}, which is not a file (paths are relative to the "
                "current directory)"
            )
    return paths


def _mapping(value: Any, key: str, source: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise StudyConfigError(f"{source}: {key} must be a non-empty mapping, got {value!r}")
    return value


def parse_study(data: Any, source: str = "<study>", out: str | None = None) -> Study:
    """Validate a loaded study YAML and build the :class:`Study`."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"{source}: a study is a mapping with keys {sorted(TOP_KEYS)}")
    _check_keys("", data, TOP_KEYS, source)
    for key in ("name", "methods", "protocols", "label_fractions"):
        if key not in data:
            raise StudyConfigError(f"{source}: missing required key {key}")
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyConfigError(f"{source}: name must be a plain word (letters, digits, _.-)")

    protocols: dict[str, Protocol] = {}
    for pname, spec in _mapping(data["protocols"], "protocols", source).items():
        key = f"protocols.{pname}"
        if not _NAME.match(str(pname)):
            raise StudyConfigError(f"{source}: {key}: names are letters, digits, _ . -")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise StudyConfigError(f"{source}: {key} must be a mapping")
        _check_keys(key, spec, PROTOCOL_KEYS, source)
        pretrained = spec.get("pretrained", True)
        if not isinstance(pretrained, bool):
            raise StudyConfigError(f"{source}: {key}.pretrained must be true or false")
        protocols[pname] = Protocol(
            pname,
            _config_paths(spec.get("configs"), f"{key}.configs", source),
            _str_list(spec.get("args"), f"{key}.args", source),
            pretrained,
        )

    methods: dict[str, Method] = {}
    for mname, spec in _mapping(data["methods"], "methods", source).items():
        key = f"methods.{mname}"
        if not _NAME.match(str(mname)) or "__" in str(mname):
            raise StudyConfigError(f"{source}: {key}: names are letters, digits, _ . - (no '__')")
        if not isinstance(spec, dict):
            raise StudyConfigError(f"{source}: {key} must be a mapping")
        _check_keys(key, spec, METHOD_KEYS, source)
        pretrain = spec.get("pretrain")
        if pretrain is not None:
            (pretrain,) = _config_paths([pretrain], f"{key}.pretrain", source)
        checkpoint = spec.get("pretrain_checkpoint", "best")
        if checkpoint not in ("best", "last"):
            raise StudyConfigError(
                f"{source}: {key}.pretrain_checkpoint must be best or last, got {checkpoint!r}"
            )
        names = _str_list(spec.get("protocols"), f"{key}.protocols", source)
        if not names:
            raise StudyConfigError(f"{source}: {key}.protocols must list at least one protocol")
        for p in names:
            if p not in protocols:
                raise StudyConfigError(
                    f"{source}: {key}.protocols names {p!r}, not defined under protocols "
                    f"({sorted(protocols)})"
                )
            if protocols[p].pretrained and pretrain is None:
                raise StudyConfigError(
                    f"{source}: {key}.protocols has {p!r}, which starts from a pretrained "
                    f"backbone, but {key}.pretrain is not set (add a pretraining config, or "
                    "use a protocol with pretrained: false)"
                )
        configs = _config_paths(spec.get("configs"), f"{key}.configs", source)
        for p in names:
            if not configs and not protocols[p].configs:
                raise StudyConfigError(
                    f"{source}: neither {key}.configs nor protocols.{p}.configs names a "
                    "downstream config"
                )
        methods[mname] = Method(
            mname,
            pretrain,
            _str_list(spec.get("pretrain_args"), f"{key}.pretrain_args", source),
            checkpoint,
            configs,
            _str_list(spec.get("args"), f"{key}.args", source),
            names,
        )

    fractions = data["label_fractions"]
    if (
        not isinstance(fractions, list)
        or not fractions
        or not all(isinstance(f, int | float) and 0 < f <= 1 for f in fractions)
    ):
        raise StudyConfigError(
            f"{source}: label_fractions must be a list of numbers in (0, 1], got {fractions!r}"
        )
    subsets = data.get("subsets", [0])
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, int) for s in subsets):
        raise StudyConfigError(f"{source}: subsets must be a list of integers, got {subsets!r}")

    reference = data.get("reference")
    if reference is not None:
        reference = model_of_study(reference, "reference", methods, source)
    comparisons = data.get("comparisons") or []
    if not isinstance(comparisons, list):
        raise StudyConfigError(f"{source}: comparisons must be a list of {{model:, against:}}")
    pairs = []
    for i, pair in enumerate(comparisons):
        where = f"comparisons[{i}]"
        if not isinstance(pair, dict) or set(pair) != {"model", "against"}:
            raise StudyConfigError(
                f"{source}: {where} must be a mapping with model and against, got {pair!r}"
            )
        pairs.append(
            (
                model_of_study(pair["model"], f"{where}.model", methods, source),
                model_of_study(pair["against"], f"{where}.against", methods, source),
            )
        )

    boot = data.get("bootstrap") or {}
    if not isinstance(boot, dict):
        raise StudyConfigError(f"{source}: bootstrap must be a mapping")
    _check_keys("bootstrap", boot, BOOTSTRAP_KEYS, source)
    n_resamples = boot.get("n_resamples", 1000)
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise StudyConfigError(f"{source}: bootstrap.n_resamples must be a positive integer")
    level = boot.get("level", 0.95)
    if not isinstance(level, float) or not 0 < level < 1:
        raise StudyConfigError(f"{source}: bootstrap.level must be in (0, 1)")

    tsne = data.get("tsne") or {}
    if not isinstance(tsne, dict):
        raise StudyConfigError(f"{source}: tsne must be a mapping")
    _check_keys("tsne", tsne, {"label_fraction"}, source)
    tsne_fraction = tsne.get("label_fraction")
    if tsne_fraction is not None and tsne_fraction not in fractions:
        raise StudyConfigError(
            f"{source}: tsne.label_fraction={tsne_fraction} is not in label_fractions {fractions}"
        )

    out_dir = out or data.get("out") or f"runs/study-{name}"
    return Study(
        name=name,
        out=Path(out_dir),
        methods=methods,
        protocols=protocols,
        label_fractions=[float(f) for f in fractions],
        subsets=list(subsets),
        common_args=list(_str_list(data.get("common_args"), "common_args", source)),
        reference=reference,
        comparisons=pairs,
        n_resamples=n_resamples,
        bootstrap_seed=int(boot.get("seed", 0)),
        level=level,
        tsne_fraction=float(tsne_fraction) if tsne_fraction is not None else None,
        source=source,
    )


def model_of_study(
    value: Any, key: str, methods: dict[str, Method] | None, source: str
) -> tuple[str, str]:
    """``{method: M, protocol: P}`` -> ``(M, P)``; when ``methods`` is given, the pair must
    be a model this study trains."""
    if not isinstance(value, dict) or set(value) != {"method", "protocol"}:
        raise StudyConfigError(
            f"{source}: {key} must be a mapping with method and protocol, got {value!r}"
        )
    m, p = str(value["method"]), str(value["protocol"])
    if methods is not None and (m not in methods or p not in methods[m].protocols):
        raise StudyConfigError(
            f"{source}: {key} {m}/{p} is not a run of this study ({key}.method must be under "
            f"methods, {key}.protocol in its protocols)"
        )
    return (m, p)


def load_study(path: str | Path, out: str | None = None) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyConfigError(f"{path} is not valid YAML: {err}") from err
    return parse_study(data, str(path), out)


def restrict_methods(study: Study, names: list[str]) -> Study:
    """The study with only the methods ``names`` (and the reference's method, which every
    comparison column needs), and the comparisons among them: to re-measure some rows of a
    study (e.g. after a method changed) without retraining the others."""
    unknown = [n for n in names if n not in study.methods]
    if unknown:
        raise StudyConfigError(
            f"{study.source}: no method {unknown} in the study; its methods are "
            f"{sorted(study.methods)}"
        )
    keep = set(names) | ({study.reference[0]} if study.reference else set())
    return replace(
        study,
        methods={k: m for k, m in study.methods.items() if k in keep},
        comparisons=[c for c in study.comparisons if c[0][0] in keep and c[1][0] in keep],
    )
