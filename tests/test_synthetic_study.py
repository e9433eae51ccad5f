"""The synthetic environment study: config checks, scenario de-duplication, the verdict rule,
the paired comparison, and a micro study through the real CLI (run, resume, outputs)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from jepa_lightning.evaluation import report
from jepa_lightning.evaluation import synthetic_study as ss
from jepa_lightning.evaluation.study_spec import Run, StudyConfigError, parse_study
from jepa_lightning.evaluation.synthetic_report import synthetic_report
from tests.helpers import QUICKSTART_FINETUNE as FINETUNE
from tests.helpers import QUICKSTART_PRETRAIN as PRETRAIN
from tests.helpers import QUIET, ROOT


def _grid(tmp_path: Path) -> Path:
    grid = {
        "name": "micro-grid",
        "common_args": [
            *QUIET,
            "--trainer.max_epochs=1",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--data.init_args.n_ehr_features=12",
        ],
        "label_fractions": [1.0],
        "subsets": [0],
        "reference": {"method": "supervised", "protocol": "scratch"},
        "bootstrap": {"n_resamples": 50, "seed": 0, "level": 0.95},
        "comparisons": [  # the grid's own pairs: reported per scenario too
            {
                "model": {"method": "supervised", "protocol": "scratch"},
                "against": {"method": "jepa", "protocol": "finetune"},
            }
        ],
        "protocols": {
            "finetune": {"configs": [FINETUNE], "pretrained": True},
            "scratch": {"configs": [FINETUNE], "pretrained": False},
        },
        "methods": {
            "jepa": {"pretrain": PRETRAIN, "protocols": ["finetune"]},
            "supervised": {"protocols": ["scratch"]},
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _spec(tmp_path: Path, **over) -> dict:
    spec = {
        "name": "micro",
        "out": str(tmp_path / "out"),
        "grid": str(_grid(tmp_path)),
        "cohort_root": str(tmp_path / "cohorts"),
        "data": {"n_patients": 40, "n_external": 12, "labeled_fraction": 0.5},
        "compare": {
            "model": {"method": "jepa", "protocol": "finetune"},
            "against": [{"method": "supervised", "protocol": "scratch"}],
        },
        "knobs": {"structure": {"key": "structure", "values": ["shared", "independent"]}},
    }
    spec.update(over)
    return spec


def test_scenarios_with_the_same_settings_run_once(tmp_path):
    spec = _spec(
        tmp_path,
        knobs={
            "structure": {"key": "structure", "values": ["shared", "independent"]},
            "missing": {"key": "ehr_missing_rate", "values": [0.15, 0.5]},
        },
    )
    study = ss.parse_synthetic_study(spec, "micro.yaml")
    assert len(study.scenarios) == 4
    # structure=shared and ehr_missing_rate=0.15 are both the default cohort
    assert len(study.unique_scenarios()) == 3
    args = study.scenarios[1].data_args(Path("c"))  # structure=independent
    assert "--data.init_args.structure=independent" in args  # strings go unquoted
    assert "--data.init_args.ehr_missing_rate=0.15" in args  # the other knob at its default


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown key colour"),
        ({"knobs": {"k": {"key": "volume", "values": [1, 2]}}}, "knobs.k.key='volume'"),
        ({"knobs": {"k": {"key": "structure", "values": ["shared"]}}}, "knobs.k.values"),
        ({"knobs": {"k": {"key": "structure", "values": [1, 2], "step": 1}}}, "knobs.k.step"),
        (
            {
                "compare": {
                    "model": {"method": "mae", "protocol": "finetune"},
                    "against": [{"method": "supervised", "protocol": "scratch"}],
                }
            },
            "mae/finetune",
        ),
        ({"data": {"root": "x"}}, "cohort_root"),
        ({"shared_pretraining": ["structure"]}, "shared_pretraining=['structure']"),
        ({"grid": "nowhere.yaml"}, "nowhere.yaml"),
    ],
)
def test_bad_config_names_the_key(tmp_path, change, message):
    with pytest.raises(StudyConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        ss.parse_synthetic_study(_spec(tmp_path, **change), "micro.yaml")


def test_scenarios_that_differ_only_in_labels_or_site_share_one_pretraining(tmp_path):
    from jepa_lightning.evaluation import runs

    spec = _spec(
        tmp_path,
        shared_pretraining=["labeled_fraction", "external_shift"],
        knobs={
            "labels": {"key": "labeled_fraction", "values": [0.25, 0.5]},
            "shift": {"key": "external_shift", "values": {0.0: {"hu": 0.0}, 1.0: {"hu": 1.0}}},
            "structure": {"key": "structure", "values": ["shared", "independent"]},
        },
    )
    study = ss.parse_synthetic_study(spec, "micro.yaml")
    by_knob = {(s.knob, s.x): study.scenario_study(s) for s in study.scenarios}
    first = by_knob[("labels", 0.25)]
    shared = [by_knob[k] for k in [("labels", 0.5), ("shift", 0.0), ("structure", "shared")]]
    for other in shared:
        assert runs.pretrain_folder(other, "jepa") == runs.pretrain_folder(first, "jepa")
        # the pretraining reads the first scenario's cohort, whichever scenario asks for it
        assert runs.pretrain_argv(other, "jepa") == runs.pretrain_argv(first, "jepa")
        assert other.out != first.out  # the downstream runs stay the scenario's own
    root = str(tmp_path / "cohorts" / study.scenarios[0].scenario_id)
    assert f"--data.init_args.root={root}" in runs.pretrain_argv(shared[1], "jepa")
    run = shared[1].runs()[0]
    own_root = str(tmp_path / "cohorts" / study.scenarios[2].scenario_id)
    assert f"--data.init_args.root={own_root}" in runs.run_argv(shared[1], run, "x.ckpt")
    independent = by_knob[("structure", "independent")]
    assert runs.pretrain_folder(independent, "jepa") != runs.pretrain_folder(first, "jepa")
    # without the key every scenario pretrains in its own folder, as before
    plain = ss.parse_synthetic_study({**spec, "shared_pretraining": []}, "micro.yaml")
    folders = {runs.pretrain_folder(plain.scenario_study(s), "jepa") for s in plain.scenarios}
    assert len(folders) == len(plain.unique_scenarios())


def test_labels_and_the_external_site_leave_the_training_archive_unchanged(tmp_path):
    """What shared_pretraining relies on: the internal scans and EHR are the same whatever
    the label weights, the labelled share or the external site."""
    from data_modules.synthetic import CohortSpec, ExternalShift, external_site, generate_cohort

    small = dict(n_patients=12, n_external=4, n_ehr_features=12, volume_shape=(12, 12, 12))
    variants = {
        "base": CohortSpec(**small),
        "changed": CohortSpec(
            **small,
            labeled_fraction=0.9,
            label_weights=(0.0, 0.2, 0.8),
            external=external_site(ExternalShift(1.0, 1.0, 1.0, 1.0, 1.0)),
        ),
    }
    tables = {}
    for name, cohort in variants.items():
        generate_cohort(tmp_path / name, cohort, progress=False, workers=1)
        tables[name] = pd.read_parquet(tmp_path / name / "manifest.parquet")
    internal = {k: t[t.cohort == "internal"].reset_index(drop=True) for k, t in tables.items()}
    ehr = [c for c in internal["base"].columns if c.startswith("ehr_")]
    pd.testing.assert_frame_equal(internal["base"][ehr], internal["changed"][ehr])
    assert not internal["base"]["label"].equals(internal["changed"]["label"])
    for image in internal["base"]["image"]:
        a, b = (nib.load(tmp_path / k / image).get_fdata() for k in variants)
        np.testing.assert_array_equal(a, b)


def test_verdict_rule():
    assert report.verdict(0.01, 0.2) == "helped"
    assert report.verdict(-0.2, -0.01) == "hurt"
    assert report.verdict(-0.05, 0.05) == "tied"


def _frame(probs: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "scan_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "cohort": "internal",
            "label": labels.astype(float),
            "prob": probs,
        }
    )


def test_comparisons_find_a_clear_difference_and_a_tie(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.clip(y * 0.6 + rng.random(300) * 0.5, 0, 1)  # nearly separable
    noise = rng.random(300)
    study = parse_study(yaml.safe_load(_grid(tmp_path).read_text()), "g", str(tmp_path / "o"))
    study.n_resamples = 200
    frames = {
        Run("jepa", "finetune", 1.0, 0): _frame(good, y),
        Run("supervised", "scratch", 1.0, 0): _frame(noise, y),
    }
    pair = [(("jepa", "finetune"), ("supervised", "scratch"))]

    def compare() -> pd.Series:
        table = report.comparisons(study, report.bootstraps(study, frames), pair, ("auroc",))
        assert len(table) == 1  # one pair, one fraction, one cohort, one metric
        return table.iloc[0]

    c = compare()
    assert (c.cohort, c.model, c.against) == ("internal", "jepa / finetune", "supervised / scratch")
    assert c.delta > 0.3 and c.delta_low > 0 and c.p_value < 0.01 and c.verdict == "helped"
    frames[Run("supervised", "scratch", 1.0, 0)] = _frame(good, y)
    c = compare()
    assert c.delta == 0 and c.verdict == "tied"


def test_micro_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    text = ss.main(["--config", str(path)])
    out = tmp_path / "out"
    for name in ("report.md", "results.csv", "comparisons.csv", "knobs.png"):
        assert (out / name).exists(), name
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert set(comparisons["x"]) == {"shared", "independent"}
    assert set(comparisons["cohort"]) == {"internal", "external"}
    assert set(comparisons["verdict"]) <= {"helped", "tied", "hurt"}
    assert "## structure" in text and "Where it helped, tied and hurt" in text
    # each Δ is the difference of the two models' AUROCs in the scenario's results table
    results = pd.read_csv(out / "results.csv")
    for r in comparisons.itertuples():
        rows = results[(results["scenario"] == r.scenario) & (results["cohort"] == r.cohort)]
        auroc = rows.set_index("method")["auroc_mean"]
        assert r.delta == pytest.approx(auroc["jepa"] - auroc["supervised"])
    # the grid's own comparison, per scenario and cohort: the same pair the other way round
    grid_pairs = pd.read_csv(out / "grid_comparisons.csv")
    assert len(grid_pairs) == len(comparisons) and "The grid's comparisons" in text
    merged = comparisons.merge(grid_pairs, on=["scenario", "cohort"], suffixes=("", "_grid"))
    assert merged["delta_grid"].to_numpy() == pytest.approx(-merged["delta"].to_numpy())
    # the two scenarios are two cohorts, generated with the asked-for structure
    cohorts = sorted((tmp_path / "cohorts").iterdir())
    assert len(cohorts) == 2
    structures = {
        yaml.safe_load((c / "cohort.json").read_text())["spec"]["structure"] for c in cohorts
    }
    assert structures == {"shared", "independent"}
    # resume: nothing runs again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    assert len(before) == 2 * 3  # per scenario: a pretraining and two runs
    ss.main(["--config", str(path)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == before


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*stud*/*.yaml")),
)
def test_every_shipped_study_config_parses(path, monkeypatch):
    """Every study YAML we ship names existing configs and known keys (what --dry-run checks)."""
    from jepa_lightning.evaluation.study_spec import load_study

    monkeypatch.chdir(ROOT)
    if path.startswith("experiments/synthetic_study/") and not path.split("/")[-1].startswith(
        "grid"
    ):
        study = ss.load_synthetic_study(path)
        assert study.unique_scenarios()
    else:
        assert load_study(path).runs()


def test_report_summary_counts_a_cohort_shared_by_two_knobs_once(tmp_path):
    spec = ss.parse_synthetic_study(
        _spec(
            tmp_path,
            knobs={
                "structure": {"key": "structure", "values": ["shared", "independent"]},
                "missing": {"key": "ehr_missing_rate", "values": [0.15, 0.5]},
            },
        ),
        "micro.yaml",
    )
    table, comparisons = [], []
    for sc in spec.scenarios:
        for model in ("jepa/finetune", "supervised/scratch"):
            method, protocol = model.split("/")
            table.append({"knob": sc.knob, "x": str(sc.x), "scenario": sc.scenario_id,
                          "cohort": "internal", "label_pct": 100.0, "method": method,
                          "protocol": protocol, "auroc_mean": 0.7})  # fmt: skip
        delta = 0.1 if sc.scenario_id == spec.scenarios[0].scenario_id else 0.0
        comparisons.append({"knob": sc.knob, "x": str(sc.x), "scenario": sc.scenario_id,
                            "model": "jepa / finetune", "against": "supervised / scratch",
                            "label_pct": 100.0, "cohort": "internal", "metric": "auroc",
                            "delta": delta, "delta_low": delta - 0.05,
                            "delta_high": delta + 0.05, "p_value": 0.5,
                            "verdict": report.verdict(delta - 0.05, delta + 0.05)})  # fmt: skip
    text = synthetic_report(spec, pd.DataFrame(table), pd.DataFrame(comparisons))
    # 4 knob values, 3 cohorts: the base cohort (structure=shared = missing=0.15) is listed once
    assert "**helped** (1 of 3 distinct comparisons)" in text
    assert "- structure=shared = missing=0.15, internal, vs supervised / scratch: Δ +0.100" in text
    assert "**tied** (2 of 3 distinct comparisons)" in text
