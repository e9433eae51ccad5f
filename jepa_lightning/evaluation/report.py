"""A study's tables and Markdown: the results table, the paired comparisons, the pretraining
health line, and the synthetic study's per-knob report (:mod:`~jepa_lightning.evaluation.synthetic_report`).

Everything here scores saved prediction tables through :mod:`~jepa_lightning.evaluation.stats`
(one :class:`~jepa_lightning.evaluation.stats.Bootstrap` per label fraction and cohort, so
every CI and every paired test of a table use the same resampled test sets); nothing here
runs a model, so a report can be remade from a finished study's folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jepa_lightning.collapse import collapse_verdict
from jepa_lightning.evaluation import stats
from jepa_lightning.evaluation.study_spec import Run, Study

log = logging.getLogger(__name__)

METRIC_NAMES = ("auroc", "auprc")
Model = tuple[str, str]  # (method, protocol)


# --- formatting -----------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (floats to 3 decimals, NaN as —)."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def model_name(method: str, protocol: str) -> str:
    return f"{method} / {protocol}"


def verdict(low: float, high: float) -> str:
    """``helped`` / ``hurt`` when the CI of the difference excludes 0, else ``tied``."""
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "tied"


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f}" + ("" if np.isnan(sd) else f" ± {sd:.3f}")


def _p(p: float) -> str:
    if np.isnan(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _ci(low: float, high: float) -> str:
    return f"[{low:+.3f}, {high:+.3f}]"


# --- statistics of a study ------------------------------------------------------------------
Bootstraps = dict[tuple[float, str], stats.Bootstrap]  # (label fraction, cohort) -> models


def in_cohort(frame: pd.DataFrame, cohort: str) -> pd.DataFrame:
    return frame[frame["cohort"] == cohort]


def bootstraps(study: Study, frames: dict[Run, pd.DataFrame]) -> Bootstraps:
    """Per (label fraction, cohort): every model of the study (the mean over its subsets)
    scored on one shared set of patient-level resamples of that cohort's scans."""
    cohorts = sorted({c for f in frames.values() for c in f["cohort"].unique()})
    out = {}
    for fraction in study.label_fractions:
        for cohort in cohorts:
            models = {
                model_name(m, p): [
                    in_cohort(frames[Run(m, p, fraction, s)], cohort) for s in study.subsets
                ]
                for m, p in study.models()
            }
            b = stats.bootstrap(models, METRIC_NAMES, study.n_resamples, study.bootstrap_seed)
            warning = stats.one_class_warning(
                f"study cohort {cohort!r} (label fraction {fraction:g})", b.label
            )
            if warning:
                log.warning("%s", warning)
            out[(fraction, cohort)] = b
    return out


def summarise(study: Study, boots: Bootstraps) -> pd.DataFrame:
    """The results table: one row per (label fraction, cohort, model): AUROC/AUPRC mean ± sd
    over subsets, the CI of that mean, and the paired p-value against the reference."""
    rows = []
    for (fraction, cohort), b in boots.items():
        for method, protocol in study.models():
            name = model_name(method, protocol)
            row: dict[str, Any] = {
                "method": method,
                "protocol": protocol,
                "label_pct": 100 * fraction,
                "cohort": cohort,
                "n_scans": len(b.label),
                "n_positive": int(b.label.sum()),
                "n_patients": b.n_patients,
                "n_subsets": len(study.subsets),
            }
            for n in METRIC_NAMES:
                s = b.summary(n, name, study.level)
                row[f"{n}_mean"], row[f"{n}_sd"] = s["mean"], s["sd"]
                row[f"{n}_ci_low"], row[f"{n}_ci_high"] = s["low"], s["high"]
                p_value = np.nan
                if study.reference and (method, protocol) != study.reference:
                    ref = model_name(*study.reference)
                    p_value = b.paired(n, name, ref, study.level)["p_value"]
                row[f"{n}_p_vs_ref"] = p_value
            row["n_valid_resamples"] = b.summary("auroc", name)["n_valid"]
            rows.append(row)
    return pd.DataFrame(rows)


def comparisons(
    study: Study,
    boots: Bootstraps,
    pairs: list[tuple[Model, Model]],
    names: tuple[str, ...] = METRIC_NAMES,
) -> pd.DataFrame:
    """Per pair, label fraction, cohort and metric: ``model - against`` (each the mean over
    subsets) on the same scans, its CI, the paired p-value and the verdict."""
    rows = []
    for model, against in pairs:
        for (fraction, cohort), b in boots.items():
            for n in names:
                c = b.paired(n, model_name(*model), model_name(*against), study.level)
                rows.append(
                    {
                        "model": model_name(*model),
                        "against": model_name(*against),
                        "label_pct": 100 * fraction,
                        "cohort": cohort,
                        "metric": n,
                        "delta": c["delta"],
                        "delta_low": c["low"],
                        "delta_high": c["high"],
                        "p_value": c["p_value"],
                        "verdict": verdict(c["low"], c["high"]),
                    }
                )
    return pd.DataFrame(rows)


# --- the study's results.md -----------------------------------------------------------------
def paper_table(study: Study, table: pd.DataFrame) -> pd.DataFrame:
    """The table as the papers print it: formatted mean ± sd, CI and p-value columns."""
    level = f"{study.level:.0%}"
    out = []
    for r in table.itertuples(index=False):
        is_ref = study.reference is not None and (r.method, r.protocol) == study.reference
        row = {
            "method": r.method,
            "protocol": r.protocol,
            "labels": f"{r.label_pct:g} %",
            "cohort": r.cohort,
            "n scans": r.n_scans,
        }
        for n, title in (("auroc", "AUROC"), ("auprc", "AUPRC")):
            row[f"{title} (mean ± sd)"] = _fmt(getattr(r, f"{n}_mean"), getattr(r, f"{n}_sd"))
            row[f"{title} {level} CI"] = (
                f"[{getattr(r, f'{n}_ci_low'):.3f}, {getattr(r, f'{n}_ci_high'):.3f}]"
            )
            if study.reference is not None:
                row[f"p {title}"] = "ref" if is_ref else _p(getattr(r, f"{n}_p_vs_ref"))
        out.append(row)
    return pd.DataFrame(out)


def comparisons_markdown(study: Study, table: pd.DataFrame) -> str:
    rows = [
        {
            "model": r.model,
            "against": r.against,
            "labels": f"{r.label_pct:g} %",
            "cohort": r.cohort,
            "metric": r.metric.upper(),
            "Δ": f"{r.delta:+.3f}",
            f"Δ {study.level:.0%} CI": _ci(r.delta_low, r.delta_high),
            "p": _p(r.p_value),
            "verdict": r.verdict,
        }
        for r in table.itertuples(index=False)
    ]
    return markdown_table(pd.DataFrame(rows))


def health_text(method: str, h: dict[str, Any]) -> str:
    """One line on a pretraining's collapse measures (see ``runs.pretraining_health``)."""

    def get(key: str) -> str:
        v = h.get(key)
        return "—" if v is None or np.isnan(v) else f"{v:.3f}"

    width = h.get("embed_dim")
    verdict = collapse_verdict(h.get("final/spread_share"), h.get("final/centred_rank"))
    return (
        f"Pretraining {method} ({h['checkpoint']}): image-only RankMe min {get('rankme_min')} "
        f"of width {width if width is not None else '—'} over the validations (random init "
        f"{get('ref/rankme')}, final {get('final/rankme')}); centred rank random init "
        f"{get('ref/centred_rank')} -> final {get('final/centred_rank')}; spread share random "
        f"init {get('ref/spread_share')} -> final {get('final/spread_share')} (collapse: "
        f"{verdict}); online image-only probe last {get('probe_last')} vs "
        f"best {get('probe_best')}; offline image-only probe (logistic regression, labelled "
        f"train -> val) random init {get('ref/probe_auroc')} -> final {get('final/probe_auroc')}."
    )


def study_markdown(
    study: Study,
    table: pd.DataFrame,
    pairs: pd.DataFrame | None,
    figures: list[Path],
    health: dict[str, dict[str, Any]],
    wall_s: float | None,
) -> str:
    """``results.md``: how the numbers were made, the table, the figures, the comparisons,
    each pretraining's health line and the wall time."""
    ref = model_name(*study.reference) if study.reference else "none"
    lines = [
        f"# Study {study.name}",
        "",
        f"Config: `{study.source}`. Label fractions of the labelled training patients: "
        f"{[f'{100 * f:g} %' for f in study.label_fractions]}; subsets (label subset and seed): "
        f"{study.subsets}. Metrics on the predicted (test) scans of each cohort: mean ± sd over "
        f"subsets; {study.level:.0%} CI: patient-level bootstrap ({study.n_resamples} resamples, "
        f"seed {study.bootstrap_seed}) of the subset mean; p: two-sided paired bootstrap test "
        f"against the reference **{ref}** at the same label fraction, on the same resamples.",
        "",
        markdown_table(paper_table(study, table)),
        "",
        *[f"![{p.stem}]({p.name})" for p in figures],
    ]
    if pairs is not None:
        lines += [
            "",
            "## Comparisons",
            "",
            "Δ = model − against (each the mean over subsets) on the same scans, with its "
            "patient-level bootstrap CI and two-sided paired p-value; *helped* / *hurt* when "
            "the CI excludes 0, *tied* otherwise.",
            "",
            comparisons_markdown(study, pairs),
        ]
    if health:
        lines += ["", *[health_text(m, h) for m, h in health.items()]]
    if wall_s is not None:
        lines += ["", f"Wall time of the runs of this invocation: {wall_s / 60:.1f} min."]
    return "\n".join(lines) + "\n"
