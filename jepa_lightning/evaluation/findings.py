"""The findings table: each finding of the papers beside ours, rebuilt from saved study outputs.

A finding is one row of ``experiments/findings/findings.yaml``: what the paper says, the
number of it, and where our answer lies in a study's saved tables (a paired difference with
its bootstrap CI, or the share of a gap a model closes). The tables are snapshots of the
studies' own ``results.csv`` / ``comparisons.csv`` / ``grid_comparisons.csv`` kept under
``experiments/findings/<study>/`` with ``measured.json`` (commit, date, wall time), so the
table is rebuilt on a clean checkout without retraining anything::

    python -m jepa_lightning.evaluation.findings table [--write README.md]
    python -m jepa_lightning.evaluation.findings collect synthetic --commit a418f98 --date 2026-12-07

``collect`` copies a finished study's tables from its ``out`` folder into the snapshot (and,
for a synthetic study, each scenario cohort's Bayes ceiling: the AUROC of the generator's
own probability of malignancy on the test scans). ``table`` prints the Markdown table;
``--write`` puts it between the ``<!-- findings:begin -->`` and ``<!-- findings:end -->``
lines of a file.

Verdicts follow the paper's direction (``expect``) and the 95 % CI of our difference:
``greater`` / ``less`` are reproduced when the CI excludes 0 on the paper's side, opposite
when it excludes 0 on the other side, not reproduced when it straddles 0; ``not_greater`` /
``not_less`` (a claim of no gain / no loss) are reproduced unless the CI excludes 0 the other
way (a tie says "tied" beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

SPEC = Path("experiments/findings/findings.yaml")
TABLES = ("results", "comparisons", "grid_comparisons")
EXPECTS = ("greater", "less", "not_greater", "not_less")
BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"


class FindingsError(ValueError):
    """The findings spec or a snapshot is wrong; the message names the file and key."""


@dataclass(frozen=True)
class Study:
    name: str
    out: Path  # the study's own output folder (what ``collect`` copies from)
    command: str
    cohort_root: Path | None = None  # a synthetic study's cohorts (for the Bayes ceiling)


def load_spec(path: Path = SPEC) -> tuple[dict[str, Study], list[dict[str, Any]]]:
    """The studies and the findings of ``path``; every error names the key."""
    if not path.is_file():
        raise FindingsError(f"{path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if set(data) != {"studies", "findings"}:
        raise FindingsError(f"{path}: give exactly the keys studies and findings")
    studies = {}
    for name, s in data["studies"].items():
        missing = {"out", "command"} - set(s)
        if missing:
            raise FindingsError(f"{path}: studies.{name} needs {sorted(missing)}")
        root = s.get("cohort_root")
        studies[name] = Study(name, Path(s["out"]), s["command"], Path(root) if root else None)
    for i, f in enumerate(data["findings"]):
        where = f"{path}: findings[{i}]"
        for key in ("finding", "paper", "study", "where"):
            if key not in f:
                raise FindingsError(f"{where} needs {key}")
        if f["study"] not in studies:
            raise FindingsError(f"{where}.study={f['study']!r} is not under studies")
        kind = f.get("kind", "delta")
        if kind == "delta" and f.get("expect") not in EXPECTS:
            raise FindingsError(f"{where}.expect={f.get('expect')!r}: choose one of {EXPECTS}")
        if kind == "gap_closed" and not {"model", "baseline", "target"} <= set(f):
            raise FindingsError(f"{where}: a gap_closed finding needs model, baseline, target")
        if kind not in ("delta", "gap_closed"):
            raise FindingsError(f"{where}.kind={kind!r}: choose delta or gap_closed")
    return studies, list(data["findings"])


def snapshot_dir(spec_path: Path, study: str) -> Path:
    return spec_path.parent / study


# --- collect --------------------------------------------------------------------------------
def collect(spec_path: Path, name: str, commit: str, date: str, wall_min: float | None) -> Path:
    """Copy study ``name``'s tables from its ``out`` into the snapshot, with provenance."""
    studies, _ = load_spec(spec_path)
    if name not in studies:
        raise FindingsError(f"{spec_path}: no study {name!r} (have {sorted(studies)})")
    study = studies[name]
    if not (study.out / "results.csv").is_file():
        raise FindingsError(f"{study.out}/results.csv does not exist: run the study first")
    dest = snapshot_dir(spec_path, name)
    dest.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        if (study.out / f"{table}.csv").is_file():
            shutil.copyfile(study.out / f"{table}.csv", dest / f"{table}.csv")
    if study.cohort_root is not None:
        from data_modules.synthetic import bayes_ceiling

        scenarios = pd.read_csv(study.out / "results.csv")["scenario"].unique()
        frames = [
            bayes_ceiling(study.cohort_root / s).assign(scenario=s) for s in sorted(scenarios)
        ]
        pd.concat(frames, ignore_index=True).to_csv(dest / "bayes.csv", index=False)
    provenance = {"commit": commit, "date": date, "wall_min": wall_min, "source": str(study.out)}
    (dest / "measured.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


# --- the table ------------------------------------------------------------------------------
def _matches(frame: pd.DataFrame, where: dict[str, Any]) -> pd.Series:
    keep = pd.Series(True, index=frame.index)
    for key, value in where.items():
        if key not in frame:
            raise FindingsError(f"no column {key!r} in the table (have {list(frame.columns)})")
        column = frame[key]
        try:
            keep &= column.astype(float) == float(value)
        except (TypeError, ValueError):
            keep &= column.astype(str) == str(value)
    return keep


def _one_row(frame: pd.DataFrame, where: dict[str, Any], label: str) -> pd.Series:
    rows = frame[_matches(frame, where)]
    if len(rows) != 1:
        raise FindingsError(f"{label}: where={where} matches {len(rows)} rows, not 1")
    return rows.iloc[0]


def delta_verdict(expect: str, low: float, high: float) -> str:
    """The paper's claim against our CI (see the module docstring)."""
    above, below = low > 0, high < 0
    if expect == "greater":
        return "reproduced" if above else "opposite" if below else "not reproduced"
    if expect == "less":
        return "reproduced" if below else "opposite" if above else "not reproduced"
    if expect == "not_greater":
        return "opposite" if above else "reproduced" if below else "reproduced (tied)"
    return "opposite" if below else "reproduced" if above else "reproduced (tied)"


def _read(snap: Path, table: str, label: str) -> pd.DataFrame:
    path = snap / f"{table}.csv"
    if not path.is_file():
        raise FindingsError(f"{label}: {path} does not exist; collect the study first")
    return pd.read_csv(path)


def finding_row(spec_path: Path, study: Study, f: dict[str, Any]) -> dict[str, str]:
    label = f"finding {f['finding']!r}"
    snap = snapshot_dir(spec_path, study.name)
    measured = json.loads((snap / "measured.json").read_text())
    if f.get("kind", "delta") == "delta":
        table = _read(snap, f.get("table", "comparisons"), label)
        r = _one_row(table, {"metric": "auroc", **f["where"]}, label)
        ours = f"{r.delta:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]"
        verdict = delta_verdict(f["expect"], r.delta_low, r.delta_high)
    else:  # the share of the gap between a baseline and the Bayes ceiling the model closes
        results = _read(snap, "results", label)
        m = _one_row(results, {**f["where"], **f["model"]}, label)
        model = m.auroc_mean
        base = _one_row(results, {**f["where"], **f["baseline"]}, label).auroc_mean
        bayes = _read(snap, "bayes", label)
        ceiling = _one_row(bayes, {"scenario": m.scenario, "cohort": m.cohort}, label).auroc
        share = (model - base) / (ceiling - base)
        ours = f"{share:+.0%} of the gap {base:.3f} → {ceiling:.3f} (model {model:.3f})"
        verdict = "met" if share >= float(f["target"]) else "missed"
    return {
        "finding": f["finding"],
        "paper": f["paper"],
        "ours: Δ AUROC [95 % CI]": ours,
        "verdict": verdict,
        "reproduce": f"`{study.command}`",
        "measured": f"{measured['commit']}, {measured['date']}",
    }


def findings_table(spec_path: Path = SPEC) -> str:
    """The Markdown table of every finding, from the snapshots alone."""
    from jepa_lightning.evaluation.report import markdown_table

    studies, findings = load_spec(spec_path)
    rows = [finding_row(spec_path, studies[f["study"]], f) for f in findings]
    return markdown_table(pd.DataFrame(rows))


def write_between_markers(path: Path, table: str) -> None:
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise FindingsError(f"{path}: put one {BEGIN} line and one {END} line where it goes")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=SPEC)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the findings table from the snapshots")
    table.add_argument("--write", type=Path, help="also put it between the markers of this file")
    grab = sub.add_parser("collect", help="snapshot a finished study's tables")
    grab.add_argument("study")
    grab.add_argument("--commit", required=True, help="the commit the study ran at")
    grab.add_argument("--date", required=True, help="the date it was measured (YYYY-MM-DD)")
    grab.add_argument("--wall-min", type=float, help="its wall time in minutes")
    args = parser.parse_args(argv)
    if args.command == "collect":
        dest = collect(args.spec, args.study, args.commit, args.date, args.wall_min)
        print(f"snapshot of {args.study} in {dest}")
        return None
    text = findings_table(args.spec)
    if args.write:
        write_between_markers(args.write, text)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except FindingsError as err:
        sys.exit(f"error: {err}")
