"""The synthetic environment study: when does multimodal JEPA pretraining help?

For each value of each scenario knob of the synthetic cohort (see
:mod:`data_modules.synthetic`), generate that cohort and run the same method grid (a
study YAML for :mod:`jepa_lightning.evaluation.study`: JEPA pretraining then finetune and
linear probe, against supervised multimodal and imaging-only models) on it; then put the
scenarios side by side: a table, a figure of AUROC with bootstrap CI bands against each
knob, internal and external, and a generated report that says where JEPA helped, tied or
hurt against each supervised baseline, with the numbers.

``python -m jepa_lightning.evaluation.synthetic_study --config
experiments/synthetic_study/quick.yaml`` (``make synthetic-study-quick``); ``--dry-run``
lists the scenarios and their runs. Everything resumes: a scenario is a study in its own
folder, and finished runs are skipped.

```yaml
name: synthetic-quick
out: runs/synthetic-study-quick
grid: experiments/synthetic_study/grid-quick.yaml  # the study YAML run in every scenario
cohort_root: data/synthetic/study                   # one cohort per scenario under here
data: {n_patients: 300, n_external: 120}            # data.init_args for every scenario
compare:                                            # the verdicts of the report
  model: {method: jepa, protocol: finetune}
  against:
    - {method: supervised_multimodal, protocol: scratch}
    - {method: supervised_image, protocol: scratch}
knobs:
  structure: {key: structure, values: [shared, independent]}
  shared_share:                  # x value -> the data value it stands for
    key: label_weights
    values: {0.0: [0.0, 0.67, 0.33], 1.0: [1.0, 0.0, 0.0]}
```

Scenarios with the same data settings (e.g. the default value of two knobs) are run once
and shared: a scenario's folder and cohort are named by a hash of its settings.

The study is split by job: :mod:`~jepa_lightning.evaluation.synthetic_spec` (the YAML and
its checks), this module (running every scenario's grid through
:mod:`~jepa_lightning.evaluation.runs`, and the command line) and
:mod:`~jepa_lightning.evaluation.synthetic_report` (scoring, figure, ``report.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jepa_lightning.evaluation import runs
from jepa_lightning.evaluation.synthetic_report import write_outputs
from jepa_lightning.evaluation.synthetic_spec import (  # noqa: F401  (re-exported)
    SyntheticStudy,
    knob_defaults,
    load_synthetic_study,
    parse_synthetic_study,
)


def _say(msg: str) -> None:
    print(f"[synthetic-study] {msg}", flush=True)


def run_all(spec: SyntheticStudy) -> None:
    """Run every distinct scenario's grid (each a study in its own folder; resumable)."""
    from data_modules.cache import shared_volume_cache  # heavy (MONAI): only when running

    unique = spec.unique_scenarios()
    t0 = time.perf_counter()
    for i, scenario in enumerate(unique, 1):
        study = spec.scenario_study(scenario)
        todo = sum(not done for _, done in runs.run_status(study))
        key = spec.knobs[scenario.knob][0]
        shown = ", ".join(
            f"{k}={json.loads(v)}" for k, v in scenario.data if k == key or k not in spec.data
        )
        _say(
            f"scenario {i}/{len(unique)} {scenario.scenario_id} ({scenario.knob}: {shown}); "
            f"{todo} runs to do; elapsed {(time.perf_counter() - t0) / 60:.1f} min"
        )
        study.out.mkdir(parents=True, exist_ok=True)
        with shared_volume_cache():  # one decode per scenario, not one per run
            runs.run_study(study)


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiments/synthetic_study/*.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list scenarios and runs only")
    args = parser.parse_args(argv)
    spec = load_synthetic_study(args.config)
    if args.dry_run:
        for s in spec.unique_scenarios():
            knobs = [f"{x.knob}={x.x}" for x in spec.scenarios if x.scenario_id == s.scenario_id]
            status = runs.run_status(spec.scenario_study(s))
            done = sum(d for _, d in status)
            print(f"{s.scenario_id} ({', '.join(knobs)}): {done}/{len(status)} runs done")
        return None
    t0 = time.perf_counter()
    run_all(spec)
    text = write_outputs(spec, time.perf_counter() - t0)
    print(text)
    _say(f"wrote {spec.out / 'report.md'}, results.csv, comparisons.csv, knobs.png")
    return text


if __name__ == "__main__":
    try:
        main()
    except (runs.StudyStateError, ValueError) as err:
        sys.exit(f"error: {err}")
