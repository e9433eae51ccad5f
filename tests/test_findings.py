"""The findings table: verdict rules, spec checks, collect -> table on a tiny study, the
README's table equal to what the shipped snapshots rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jepa_lightning.evaluation import findings as fx
from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("expect", "low", "high", "verdict"),
    [
        ("greater", 0.01, 0.1, "reproduced"),
        ("greater", -0.1, 0.1, "not reproduced"),
        ("greater", -0.1, -0.01, "opposite"),
        ("less", -0.1, -0.01, "reproduced"),
        ("less", 0.01, 0.1, "opposite"),
        ("not_greater", -0.1, 0.1, "reproduced (tied)"),
        ("not_greater", -0.1, -0.01, "reproduced"),
        ("not_greater", 0.01, 0.1, "opposite"),
        ("not_less", -0.1, -0.01, "opposite"),
    ],
)
def test_verdict_follows_the_papers_direction(expect, low, high, verdict):
    assert fx.delta_verdict(expect, low, high) == verdict


def _study_out(tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "s"
    out.mkdir(parents=True)
    pd.DataFrame(
        [
            {"knob": "k", "x": "0.05", "scenario": "s-1", "cohort": "internal",
             "method": m, "protocol": p, "label_pct": 100.0, "auroc_mean": a}
            for m, p, a in [("jepa", "finetune", 0.80), ("sup", "scratch", 0.70)]
        ]
    ).to_csv(out / "results.csv", index=False)  # fmt: skip
    pd.DataFrame(
        [{"knob": "k", "x": "0.05", "scenario": "s-1", "model": "jepa / finetune",
          "against": "sup / scratch", "label_pct": 100.0, "cohort": "internal",
          "metric": metric, "delta": 0.1, "delta_low": 0.04, "delta_high": 0.16,
          "p_value": 0.002, "verdict": "helped"} for metric in ("auroc", "auprc")]
    ).to_csv(out / "comparisons.csv", index=False)  # fmt: skip
    return out


def _spec(tmp_path: Path, out: Path, cohort_root: Path | None = None) -> Path:
    study = {"out": str(out), "command": "make s"}
    if cohort_root is not None:
        study["cohort_root"] = str(cohort_root)
    spec = {
        "studies": {"s": study},
        "findings": [
            {"finding": "JEPA beats scratch", "paper": "0.91 vs 0.88", "study": "s",
             "where": {"knob": "k", "x": 0.05, "cohort": "internal",
                       "model": "jepa / finetune", "against": "sup / scratch"},
             "expect": "greater"},
        ],
    }  # fmt: skip
    path = tmp_path / "findings" / "findings.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    return path


def test_collect_then_table_from_the_snapshot_alone(tmp_path):
    out = _study_out(tmp_path)
    spec = _spec(tmp_path, out)
    fx.main(["--spec", str(spec), "collect", "s", "--commit", "abc1234", "--date", "2026-12-07"])
    snap = spec.parent / "s"
    assert json.loads((snap / "measured.json").read_text())["commit"] == "abc1234"
    (out / "results.csv").unlink()  # the table needs the snapshot only
    text = fx.findings_table(spec)
    assert "+0.100 [+0.040, +0.160]" in text and "| reproduced |" in text
    assert "abc1234, 2026-12-07" in text and "`make s`" in text


def test_gap_closed_reads_the_bayes_ceiling_of_the_scenario(tmp_path, monkeypatch):
    out = _study_out(tmp_path)
    spec = _spec(tmp_path, out, cohort_root=tmp_path / "cohorts")
    data = yaml.safe_load(spec.read_text())
    data["findings"].append(
        {"finding": "half the gap", "paper": "-", "study": "s", "kind": "gap_closed",
         "where": {"knob": "k", "x": 0.05, "cohort": "internal"},
         "model": {"method": "jepa", "protocol": "finetune"},
         "baseline": {"method": "sup", "protocol": "scratch"}, "target": 0.5}
    )  # fmt: skip
    spec.write_text(yaml.safe_dump(data))
    import data_modules.synthetic as synthetic

    monkeypatch.setattr(
        synthetic,
        "bayes_ceiling",
        lambda root: pd.DataFrame([{"cohort": "internal", "auroc": 0.9}]),
    )
    fx.collect(spec, "s", "abc1234", "2026-12-07", 12.5)
    text = fx.findings_table(spec)
    assert "+50% of the gap 0.700 → 0.900 (model 0.800)" in text and "| met |" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"findings": [{"finding": "f", "paper": "p", "study": "nope", "where": {}}]}, "nope"),
        (
            {
                "findings": [
                    {"finding": "f", "paper": "p", "study": "s", "where": {}, "expect": "up"}
                ]
            },
            "expect='up'",
        ),
        ({"colour": 1}, "exactly the keys"),
    ],
)
def test_bad_spec_names_the_key(tmp_path, change, message):
    spec = _spec(tmp_path, tmp_path)
    data = {**yaml.safe_load(spec.read_text()), **change}
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(fx.FindingsError, match=message):
        fx.load_spec(spec)


def test_a_where_that_matches_no_row_is_named(tmp_path):
    out = _study_out(tmp_path)
    spec = _spec(tmp_path, out)
    data = yaml.safe_load(spec.read_text())
    data["findings"][0]["where"]["cohort"] = "external"
    spec.write_text(yaml.safe_dump(data))
    fx.collect(spec, "s", "abc1234", "2026-12-07", None)
    with pytest.raises(fx.FindingsError, match="JEPA beats scratch.*matches 0 rows"):
        fx.findings_table(spec)


def test_write_puts_the_table_between_the_markers(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{fx.BEGIN}\nold\n{fx.END}\nafter\n")
    fx.write_between_markers(page, "| new |")
    assert page.read_text() == f"intro\n{fx.BEGIN}\n| new |\n{fx.END}\nafter\n"
    page.write_text("no markers")
    with pytest.raises(fx.FindingsError, match="markers|findings:begin"):
        fx.write_between_markers(page, "| new |")


def test_the_readme_table_is_what_the_shipped_snapshots_rebuild(monkeypatch):
    """Every figure of the README's findings table comes from a committed snapshot."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    shown = readme.split(fx.BEGIN)[1].split(fx.END)[0].strip()
    assert shown == fx.findings_table(ROOT / fx.SPEC).strip()
