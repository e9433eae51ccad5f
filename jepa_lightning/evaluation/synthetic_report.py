"""The synthetic study's scoring and report: each scenario's grid scored like any study
(:mod:`~jepa_lightning.evaluation.report`), put side by side per knob, with the figure of
AUROC against each knob and ``report.md`` saying where the model helped, tied or hurt.
Nothing here runs a model: a finished study's folder is enough.
"""

from __future__ import annotations

import json

import pandas as pd

from jepa_lightning.evaluation import report, runs
from jepa_lightning.evaluation.plots import knob_figure
from jepa_lightning.evaluation.report import _ci, _p, markdown_table, model_name
from jepa_lightning.evaluation.synthetic_spec import SyntheticStudy


def collect(spec: SyntheticStudy) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The per-model table, the comparison table (``spec.model`` against each of
    ``spec.against``) and the grid's own ``comparisons`` (empty when it has none), one block
    of rows per scenario (a scenario shared by two knobs appears under both); each scenario
    is scored once."""
    pairs = [(spec.model, ref) for ref in spec.against]
    scored: dict[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = {}
    outs: tuple[list, list, list] = ([], [], [])
    for scenario in spec.scenarios:
        if scenario.scenario_id not in scored:
            study = spec.scenario_study(scenario)
            boots = report.bootstraps(study, runs.load_predictions(study))
            # per cohort, then per reference (the report's order)
            blocks = [
                report.comparisons(study, boots, p, ("auroc",)).sort_values(
                    ["label_pct", "cohort"], kind="stable"
                )
                for p in (pairs, study.comparisons)
            ]
            scored[scenario.scenario_id] = (report.summarise(study, boots), *blocks)
        for block, out in zip(scored[scenario.scenario_id], outs, strict=True):
            block = block.copy()
            block.insert(0, "knob", scenario.knob)
            block.insert(1, "x", str(scenario.x))
            block.insert(2, "scenario", scenario.scenario_id)
            out.append(block)
    table, comparisons, grid_pairs = (pd.concat(o, ignore_index=True) for o in outs)
    return table, comparisons, grid_pairs


def grid_comparisons_section(grid_pairs: pd.DataFrame, level: float) -> str:
    """The grid's own comparisons, per knob value and cohort, as a Markdown section."""
    if grid_pairs.empty:
        return ""
    rows = [
        {
            r.knob: r.x,
            "labels": f"{r.label_pct:.0f} %",
            "cohort": r.cohort,
            "model": r.model,
            "against": r.against,
            "Δ AUROC": f"{r.delta:+.3f}",
            f"Δ {level:.0%} CI": report._ci(r.delta_low, r.delta_high),
            "p": report._p(r.p_value),
            "verdict": r.verdict,
        }
        for r in grid_pairs.itertuples(index=False)
    ]
    table = report.markdown_table(pd.DataFrame(rows).fillna(""))
    return f"\n## The grid's comparisons (`grid_comparisons.csv`)\n\n{table}\n"


def synthetic_report(spec: SyntheticStudy, table: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """Per knob and value, the model against each reference, and the regimes in which it
    helped, tied or hurt — every claim with its number and CI (AUROC)."""
    model = model_name(*spec.model)
    pairs = pairs[pairs["metric"] == "auroc"]
    lines = [
        f"# Synthetic study `{spec.name}`: when does {model} help?",
        "",
        f"Config `{spec.source}`; method grid `{spec.grid}`; base data settings "
        f"`{json.dumps(spec.data)}`. AUROC on each cohort's test scans, mean over the grid's "
        f"subsets; Δ = {model} minus the reference on the same scans, with its patient-level "
        f"bootstrap {spec.level:.0%} CI ({spec.n_resamples} resamples). *helped* / *hurt*: "
        "the CI excludes 0; *tied*: it does not.",
        "",
    ]
    names = table["method"] + " / " + table["protocol"]
    # A scenario shared by several knobs (the base cohort is every knob's default value)
    # appears under each of them; the summary lists each distinct comparison once.
    distinct: dict[tuple, dict] = {}
    for knob, (key, _, text) in spec.knobs.items():
        lines += [f"## {knob} (`data.init_args.{key}`)", ""]
        if text:
            lines += [text, ""]
        rows = []
        for r in pairs[pairs["knob"] == knob].itertuples(index=False):
            same = (
                (table["knob"] == knob)
                & (table["x"] == r.x)
                & (table["cohort"] == r.cohort)
                & (table["label_pct"] == r.label_pct)
            )
            rows.append(
                {
                    knob: r.x,
                    "cohort": r.cohort,
                    "reference": r.against,
                    model: f"{table.loc[same & (names == model), 'auroc_mean'].iloc[0]:.3f}",
                    "reference AUROC": (
                        f"{table.loc[same & (names == r.against), 'auroc_mean'].iloc[0]:.3f}"
                    ),
                    "Δ AUROC": f"{r.delta:+.3f}",
                    f"Δ {spec.level:.0%} CI": _ci(r.delta_low, r.delta_high),
                    "p": _p(r.p_value),
                    "verdict": r.verdict,
                }
            )
            entry = distinct.setdefault(
                (r.scenario, r.cohort, r.against, r.label_pct), {"where": [], "row": r}
            )
            entry["where"].append(f"{knob}={r.x}")
        lines += [markdown_table(pd.DataFrame(rows)), ""]
    verdicts: dict[str, list[str]] = {"helped": [], "tied": [], "hurt": []}
    for entry in distinct.values():
        r = entry["row"]
        verdicts[r.verdict].append(
            f"{' = '.join(entry['where'])}, {r.cohort}, vs {r.against}: Δ {r.delta:+.3f} "
            f"{_ci(r.delta_low, r.delta_high)}"
        )
    lines += [
        "## Where it helped, tied and hurt",
        "",
        "Each distinct comparison once; `a=x = b=y` marks one cohort that is the value of "
        "several knobs (the base cohort is every knob's default).",
        "",
    ]
    for v in ("helped", "tied", "hurt"):
        items = verdicts[v]
        lines.append(
            f"**{v}** ({len(items)} of {len(distinct)} distinct comparisons)"
            + (":" if items else ".")
        )
        lines += [f"- {i}" for i in items]
        lines.append("")
    lines += ["![AUROC against each knob](knobs.png)", ""]
    return "\n".join(lines)


def write_outputs(spec: SyntheticStudy, wall_s: float | None = None) -> str:
    table, comparisons, grid_pairs = collect(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(spec.out / "results.csv", index=False)
    comparisons.to_csv(spec.out / "comparisons.csv", index=False)
    if not grid_pairs.empty:
        grid_pairs.to_csv(spec.out / "grid_comparisons.csv", index=False)
    knob_figure(
        table,
        {knob: [str(x) for x in values] for knob, (_, values, _) in spec.knobs.items()},
        f"Synthetic study {spec.name}: AUROC (mean over subsets, {spec.level:.0%} CI band)",
        spec.out / "knobs.png",
    )
    text = synthetic_report(spec, table, comparisons)
    text += grid_comparisons_section(grid_pairs, spec.level)
    if wall_s is not None:
        text += f"\nWall time of the runs of this invocation: {wall_s / 60:.1f} min.\n"
    (spec.out / "report.md").write_text(text)
    return text
