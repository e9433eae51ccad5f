"""The synthetic study's YAML: the scenarios (one knob set to one value each), checked up
front so a typo fails before hours of training, with the key named.

See :mod:`~jepa_lightning.evaluation.synthetic_study` for the YAML and how it runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jepa_lightning.evaluation.study_spec import (
    Study,
    StudyConfigError,
    load_study,
    model_of_study,
)

TOP_KEYS = {
    "name", "out", "grid", "cohort_root", "data", "compare", "knobs", "bootstrap",
    "shared_pretraining",
}  # fmt: skip
KNOB_KEYS = {"key", "values", "description"}
# Data keys a knob may set: the synthetic cohort's scenario settings.
KNOB_DATA_KEYS = {
    "structure",
    "label_weights",
    "labeled_fraction",
    "ehr_missing_rate",
    "external_shift",
    "n_patients",
    "n_external",
    "seed",
    "scans_per_patient",
    "scan_interval_days",
    "growth_signal",
    "image_signal",
}

# Data keys that leave a cohort's internal scans and EHR unchanged: the label (its weights,
# who shows it) and the external site. Internal patients are drawn from their own seeded
# streams and the pretraining never sees a label (the online probes read detached features),
# so scenarios that differ only in these keys can share one pretraining
# (``shared_pretraining``) without changing a single weight of it.
PRETRAINING_INVARIANT_KEYS = {"label_weights", "labeled_fraction", "external_shift", "n_external"}


@dataclass(frozen=True)
class Scenario:
    """One synthetic cohort: the base data settings with one knob set to one value."""

    knob: str
    x: Any
    data: tuple[tuple[str, str], ...]  # sorted (key, JSON value) pairs

    @property
    def scenario_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.data).encode()).hexdigest()[:10]
        return f"s-{digest}"

    def archive_id(self, shared: frozenset[str]) -> str:
        """Names the pretraining archive: the settings left when the ``shared`` keys (which
        do not change what a pretraining sees) are dropped."""
        kept = [pair for pair in self.data if pair[0] not in shared]
        return "a-" + hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:10]

    def data_args(self, cohort_root: Path) -> list[str]:
        args = [f"--data.init_args.root={cohort_root / self.scenario_id}"]
        for key, encoded in self.data:
            value = json.loads(encoded)  # strings go bare: jsonargparse reads '"x"' as quoted
            args.append(f"--data.init_args.{key}={value if isinstance(value, str) else encoded}")
        return args


@dataclass
class SyntheticStudy:
    name: str
    out: Path
    grid: Path
    cohort_root: Path
    data: dict[str, Any]
    knobs: dict[str, tuple[str, dict[Any, Any], str]]  # name -> (data key, {x: value}, text)
    model: tuple[str, str]
    against: list[tuple[str, str]]
    bootstrap: dict[str, Any] = field(default_factory=dict)  # overrides the grid's
    source: str = "<synthetic study>"
    shared_pretraining: frozenset[str] = frozenset()  # see PRETRAINING_INVARIANT_KEYS
    scenarios: list[Scenario] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Every knob's key is set in every scenario (to its default where another knob is
        # varied), so scenarios with the same settings get the same id and run once.
        defaults = knob_defaults()
        fixed = {key: defaults[key] for key, _, _ in self.knobs.values()}
        for knob, (key, values, _) in self.knobs.items():
            for x, value in values.items():
                data = {**fixed, **self.data, key: value}
                pairs = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in data.items()))
                self.scenarios.append(Scenario(knob, x, pairs))

    def unique_scenarios(self) -> list[Scenario]:
        seen: dict[str, Scenario] = {}
        for s in self.scenarios:
            seen.setdefault(s.scenario_id, s)
        return list(seen.values())

    def scenario_study(self, scenario: Scenario) -> Study:
        study = load_study(self.grid, str(self.out / "scenarios" / scenario.scenario_id))
        grid_args = list(study.common_args)
        study.common_args = [*grid_args, *scenario.data_args(self.cohort_root)]
        study.n_resamples = int(self.bootstrap.get("n_resamples", study.n_resamples))
        study.bootstrap_seed = int(self.bootstrap.get("seed", study.bootstrap_seed))
        study.level = float(self.bootstrap.get("level", study.level))
        if self.shared_pretraining:
            # One pretraining per archive, on the cohort of its first scenario (YAML order).
            archive = scenario.archive_id(self.shared_pretraining)
            first = next(
                s for s in self.scenarios if s.archive_id(self.shared_pretraining) == archive
            )
            study.pretrain_root = self.out / "pretrain" / archive
            study.pretrain_common_args = [*grid_args, *first.data_args(self.cohort_root)]
        return study

    @property
    def level(self) -> float:
        return float(self.bootstrap.get("level", load_study(self.grid).level))

    @property
    def n_resamples(self) -> int:
        return int(self.bootstrap.get("n_resamples", load_study(self.grid).n_resamples))


def knob_defaults() -> dict[str, Any]:
    """The synthetic data module's default for every knob, as plain JSON-able values."""
    import inspect
    from dataclasses import asdict

    from data_modules.synthetic import ExternalShift, SyntheticCohortDataModule

    params = inspect.signature(SyntheticCohortDataModule.__init__).parameters
    out = {k: params[k].default for k in KNOB_DATA_KEYS if k in params}
    out["external_shift"] = asdict(ExternalShift())
    return json.loads(json.dumps(out))  # tuples -> lists, as YAML gives them


def _err(source: str, msg: str) -> StudyConfigError:
    return StudyConfigError(f"{source}: {msg}")


def parse_synthetic_study(data: Any, source: str = "<synthetic study>") -> SyntheticStudy:
    """Validate a loaded synthetic-study YAML; every error names the key."""
    if not isinstance(data, dict):
        raise _err(source, f"a synthetic study is a mapping with keys {sorted(TOP_KEYS)}")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _err(source, f"unknown key {unknown[0]} (allowed: {sorted(TOP_KEYS)})")
    for key in ("name", "grid", "knobs", "compare"):
        if key not in data:
            raise _err(source, f"missing required key {key}")
    grid = Path(data["grid"])
    if not grid.is_file():
        raise _err(source, f"grid names {grid}, which is not a file (relative to the cwd)")
    grid_study = load_study(grid)
    base = data.get("data") or {}
    if not isinstance(base, dict):
        raise _err(source, "data must be a mapping of data.init_args keys")
    if "root" in base:
        raise _err(source, "data.root is set per scenario; use cohort_root instead")

    knobs: dict[str, tuple[str, dict[Any, Any], str]] = {}
    if not isinstance(data["knobs"], dict) or not data["knobs"]:
        raise _err(source, "knobs must be a non-empty mapping")
    for name, spec in data["knobs"].items():
        where = f"knobs.{name}"
        if not isinstance(spec, dict):
            raise _err(source, f"{where} must be a mapping with key and values")
        bad = sorted(set(spec) - KNOB_KEYS)
        if bad:
            raise _err(source, f"unknown key {where}.{bad[0]} (allowed: {sorted(KNOB_KEYS)})")
        key = spec.get("key")
        if key not in KNOB_DATA_KEYS:
            raise _err(
                source, f"{where}.key={key!r} is not a scenario setting ({sorted(KNOB_DATA_KEYS)})"
            )
        values = spec.get("values")
        if isinstance(values, list) and values:
            values = {(v if isinstance(v, int | float | str) else json.dumps(v)): v for v in values}
        if not isinstance(values, dict) or len(values) < 2:
            raise _err(source, f"{where}.values must list at least two values (or map x -> value)")
        knobs[name] = (key, values, str(spec.get("description", "")))

    compare = data["compare"]
    if not isinstance(compare, dict) or set(compare) != {"model", "against"}:
        raise _err(source, "compare must be a mapping with model and against")
    model = model_of_study(compare["model"], "compare.model", None, source)
    against_raw = compare["against"]
    if not isinstance(against_raw, list) or not against_raw:
        raise _err(source, "compare.against must be a non-empty list")
    against = [
        model_of_study(a, f"compare.against[{i}]", None, source) for i, a in enumerate(against_raw)
    ]
    for m, p in [model, *against]:
        if m not in grid_study.methods or p not in grid_study.methods[m].protocols:
            raise _err(source, f"compare names {m}/{p}, which is not a run of the grid {grid}")

    shared = data.get("shared_pretraining") or []
    if not isinstance(shared, list) or not set(shared) <= PRETRAINING_INVARIANT_KEYS:
        raise _err(
            source,
            f"shared_pretraining={shared!r}: list data keys that leave the training archive "
            f"unchanged, from {sorted(PRETRAINING_INVARIANT_KEYS)}",
        )
    boot = data.get("bootstrap") or {}
    if not isinstance(boot, dict) or set(boot) - {"n_resamples", "seed", "level"}:
        raise _err(source, "bootstrap may set n_resamples, seed and level")
    name = data["name"]
    return SyntheticStudy(
        name=str(name),
        out=Path(data.get("out") or f"runs/synthetic-study-{name}"),
        grid=grid,
        cohort_root=Path(data.get("cohort_root") or "data/synthetic/study"),
        data=base,
        knobs=knobs,
        model=model,
        against=against,
        bootstrap=dict(boot),
        source=source,
        shared_pretraining=frozenset(shared),
    )


def load_synthetic_study(path: str | Path) -> SyntheticStudy:
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"synthetic study config {path} does not exist")
    return parse_synthetic_study(yaml.safe_load(path.read_text()), str(path))
