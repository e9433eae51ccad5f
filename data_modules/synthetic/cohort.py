"""Writing a synthetic cohort to disk (and the ``python -m data_modules.synthetic`` CLI).

``latents.parquet`` records every cause, the label's probability, the nodule and each
finding's value beside the manifest, for checks and studies. Each patient's files are a
pure function of ``(spec, cohort, index)``, so a cohort is the same for any number of
generating processes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.cohort_files import (
    default_workers,
    existing_cohort,
    map_records,
    save_ct,
    written_atomically,
)
from data_modules.synthetic.causes import (
    World,
    diffuse_findings,
    doubling_time,
    finding_drivers,
    label_logit,
    make_world,
    nodule_at,
    nodule_params,
    patient_causes,
    scan_days,
)
from data_modules.synthetic.render import ehr_vector, nodule_reach_mm, render_ct
from data_modules.synthetic.spec import (
    STRUCTURES,
    CohortSpec,
    ExternalShift,
    external_site,
    feature_names,
)

FORMAT_VERSION = 2  # 2: diffuse findings, off-centre nodule


def _patient_rows(spec: CohortSpec) -> list[tuple[str, int, str]]:
    """(cohort, index, split) for every patient, with patient-level splits."""
    rng = np.random.default_rng([spec.seed, 7])
    n = spec.n_patients
    order = rng.permutation(n)
    n_test, n_val = round(spec.test_fraction * n), round(spec.val_fraction * n)
    split = np.empty(n, dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_val]] = "val"
    split[order[n_test + n_val :]] = "train"
    rows = [("internal", i, split[i]) for i in range(n)]
    return rows + [("external", i, "test") for i in range(spec.n_external)]


@dataclass(frozen=True)
class _Job:
    """Everything one patient's files depend on besides the spec and the world."""

    cohort: str
    index: int
    split: str
    shown: bool  # whether the manifest shows the label


def patient_record(
    job: _Job, spec: CohortSpec, world: World, out_dir: Path
) -> list[tuple[dict, dict]]:
    """Render one patient's scans, write their NIfTIs under ``out_dir/images``, return each
    scan's manifest and latents rows in time order. A pure function of ``(spec, job)``: its
    random streams are seeded by ``(seed, cohort, index)``, so the result does not depend on
    which process runs it.

    The latest scan is drawn from the streams a single-scan patient has always used (so the
    default one-scan cohort is the same as before the longitudinal settings existed); the
    growth, the schedule and every earlier scan's noise and EHR come from streams of their own.
    """
    site = spec.internal if job.cohort == "internal" else spec.external
    key = [spec.seed, 0 if job.cohort == "internal" else 1, job.index]
    rng = np.random.default_rng(key)
    causes = patient_causes(rng, spec)
    p = 1 / (1 + math.exp(-label_logit(causes, spec, site.prevalence)))
    truth = int(rng.random() < p)
    # The image and the EHR draw from their own streams, so changing one never moves the other.
    image_rng, ehr_rng = np.random.default_rng([*key, 1]), np.random.default_rng([*key, 2])
    # image_signal: the part of the image that must not carry the label follows causes of
    # its own, from a stream of its own (so drawing them moves no other draw).
    decoy = patient_causes(np.random.default_rng([*key, 7]), spec)
    nodule = nodule_params(decoy if spec.image_signal == "global" else causes)
    finding_causes = decoy if spec.image_signal == "local" else causes
    findings = diffuse_findings(finding_drivers(image_rng, finding_causes))
    doubling_days, follows = doubling_time(
        np.random.default_rng([*key, 3]), truth, spec.growth_signal, site.prevalence
    )
    days = scan_days(np.random.default_rng([*key, 4]), spec)
    t_rel = days - days[-1]
    earlier = range(len(days) - 1)
    nodules = [nodule_at(nodule, t_rel[k], doubling_days) for k in earlier] + [nodule]
    noise_rngs = [np.random.default_rng([*key, 5, k + 1]) for k in earlier]
    vols, affine, centre = render_ct(
        image_rng, nodule, findings, spec, site, list(zip(nodules[:-1], noise_rngs, strict=True))
    )
    ehr_latest = ehr_vector(ehr_rng, causes, spec, world, site)
    ehrs = []
    for k in earlier:  # fresh measurement noise and missingness; the age at that scan
        ehr = ehr_vector(np.random.default_rng([*key, 6, k + 1]), causes, spec, world, site)
        ehr[0] = ehr_latest[0] + t_rel[k] / 365.25
        ehrs.append(ehr)
    ehrs.append(ehr_latest)

    pid = f"{job.cohort[:3]}-{job.index:05d}"
    names = feature_names(spec.n_ehr_features)
    causes_row = {
        **{f"shared_{k}": v for k, v in enumerate(causes["shared"])},
        **{f"image_only_{k}": v for k, v in enumerate(causes["image_only"])},
        **{f"ehr_only_{k}": v for k, v in enumerate(causes["ehr_only"])},
        **{f"ehr_side_{k}": v for k, v in enumerate(causes.get("ehr_side", []))},
    }
    rows = []
    latest = len(days) - 1
    for k, (vol, ehr, scan_nodule) in enumerate(zip(vols, ehrs, nodules, strict=True)):
        scan_id = f"{pid}-s{k}"
        save_ct(vol, affine, out_dir / "images" / f"{scan_id}.nii.gz")
        manifest = {
            "patient_id": pid,
            "scan_id": scan_id,
            "image": f"images/{scan_id}.nii.gz",
            "label": float(truth) if job.shown and k == latest else np.nan,
            "cohort": job.cohort,
            "split": job.split,
            "scan_time": float(days[k]),
            "roi_x": centre[0],
            "roi_y": centre[1],
            "roi_z": centre[2],
            "roi_space": "ras_mm",
            **dict(zip(names, ehr.tolist(), strict=True)),
        }
        latents = {
            "scan_id": scan_id,
            "true_label": truth,
            "p_malignant": p,
            **causes_row,
            **nodule,
            "radius_mm": scan_nodule["radius_mm"],  # this scan's
            "nodule_x": centre[0],
            "nodule_y": centre[1],
            "nodule_z": centre[2],
            "nodule_reach_mm": nodule_reach_mm(scan_nodule),
            **findings,
        }
        if spec.longitudinal:  # (one-scan cohorts keep the columns they always had)
            latents["doubling_time_days"] = doubling_days
            latents["growth_follows_label"] = follows
        rows.append((manifest, latents))
    return rows


def _jobs(spec: CohortSpec) -> list[_Job]:
    """One job per patient, with the patient-level split and whether its label is shown."""
    rows = _patient_rows(spec)
    train_ids = [i for c, i, s in rows if c == "internal" and s == "train"]
    label_rng = np.random.default_rng([spec.seed, 11])
    n_lab = round(spec.labeled_fraction * len(train_ids))
    labelled_train = set(label_rng.choice(train_ids, size=n_lab, replace=False).tolist())
    return [
        _Job(c, i, s, c == "external" or s != "train" or i in labelled_train) for c, i, s in rows
    ]


def generate_cohort(
    root: str | Path,
    spec: CohortSpec | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the cohort (``images/*.nii.gz``, ``manifest.parquet``, ``latents.parquet``,
    ``cohort.json``) to ``root``, which must not exist or be empty. Returns the manifest path.

    ``workers`` processes render the scans (default :func:`default_workers`); the files are
    identical for any number, since every patient's random streams are its own. Files are
    written to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half cohort that looks complete.
    """
    spec = spec or CohortSpec()
    root = Path(root)
    with written_atomically(root) as tmp:
        (tmp / "images").mkdir()
        context = (spec, make_world(spec), tmp)
        records = map_records(
            patient_record, _jobs(spec), context, workers, 32, 8, "synthetic cohort", progress
        )
        rows = [row for patient in records for row in patient]
        pd.DataFrame([m for m, _ in rows]).to_parquet(tmp / "manifest.parquet", index=False)
        pd.DataFrame([lat for _, lat in rows]).to_parquet(tmp / "latents.parquet", index=False)
        (tmp / "cohort.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, "spec": spec.to_json()}, indent=2)
        )
    return root / "manifest.parquet"


def ensure_cohort(
    root: str | Path, spec: CohortSpec, progress: bool = True, workers: int | None = None
) -> Path:
    """The cohort at ``root``: reused when its ``cohort.json`` matches ``spec``, generated (by
    ``workers`` processes) when ``root`` is empty or absent, and never written over otherwise."""
    found = existing_cohort(
        root, spec.to_json(), CohortSpec().to_json(), FORMAT_VERSION, "synthetic"
    )
    if found is not None:
        return found
    return generate_cohort(root, spec, progress, workers)


def bayes_ceiling(root: str | Path) -> pd.DataFrame:
    """The best AUROC any model can reach on each cohort's test scans: that of the
    generator's own probability of malignancy (``p_malignant``), one row per cohort
    (``cohort``, ``n_scans``, ``auroc``). Only labelled test scans count, as in a study."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    root = Path(root)
    manifest = pd.read_parquet(root / "manifest.parquet")
    latents = pd.read_parquet(root / "latents.parquet")
    test = manifest[(manifest["split"] == "test") & manifest["label"].notna()]
    test = test.merge(latents[["scan_id", "p_malignant"]], on="scan_id")
    rows = []
    for cohort, g in test.groupby("cohort"):
        score = torch.tensor(g["p_malignant"].to_numpy())
        truth = torch.tensor(g["label"].to_numpy()).long()
        rows.append(
            {"cohort": cohort, "n_scans": len(g), "auroc": float(binary_auroc(score, truth))}
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.synthetic",
        description="Write a synthetic CT + EHR cohort to disk.",
    )
    parser.add_argument("--root", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--n-patients", type=int, default=CohortSpec.n_patients)
    parser.add_argument("--n-external", type=int, default=CohortSpec.n_external)
    parser.add_argument("--labeled-fraction", type=float, default=CohortSpec.labeled_fraction)
    parser.add_argument("--n-ehr-features", type=int, default=CohortSpec.n_ehr_features)
    parser.add_argument("--seed", type=int, default=CohortSpec.seed)
    parser.add_argument("--structure", choices=STRUCTURES, default=CohortSpec.structure)
    parser.add_argument(
        "--label-weights",
        type=float,
        nargs=3,
        default=CohortSpec.label_weights,
        metavar=("SHARED", "IMAGE_ONLY", "EHR_ONLY"),
    )
    parser.add_argument("--ehr-missing-rate", type=float, default=CohortSpec.ehr_missing_rate)
    parser.add_argument(
        "--external-shift",
        type=float,
        default=0.5,
        help="strength 0..1 of every aspect of the external site's shift",
    )
    parser.add_argument(
        "--scans-per-patient",
        type=int,
        nargs=2,
        default=CohortSpec.scans_per_patient,
        metavar=("MIN", "MAX"),
        help="uniform number of scans per patient, both inclusive (default 1 1)",
    )
    parser.add_argument(
        "--scan-interval-days",
        type=float,
        nargs=2,
        default=CohortSpec.scan_interval_days,
        metavar=("MIN", "MAX"),
        help="days between consecutive scans, uniform (default 90 540)",
    )
    parser.add_argument(
        "--growth-signal",
        type=float,
        default=CohortSpec.growth_signal,
        help="0..1: share of patients whose nodule grows as its label says (default 0)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"generation processes (default {default_workers()}); the files do not depend on it",
    )
    args = parser.parse_args(argv)
    s = args.external_shift
    spec = CohortSpec(
        n_patients=args.n_patients,
        n_external=args.n_external,
        labeled_fraction=args.labeled_fraction,
        n_ehr_features=args.n_ehr_features,
        seed=args.seed,
        structure=args.structure,
        label_weights=tuple(args.label_weights),
        ehr_missing_rate=args.ehr_missing_rate,
        external=external_site(ExternalShift(s, s, s, s, s)),
        scans_per_patient=tuple(args.scans_per_patient),
        scan_interval_days=tuple(args.scan_interval_days),
        growth_signal=args.growth_signal,
    )
    path = ensure_cohort(args.root, spec, workers=args.workers)
    print(f"cohort ready: {path}")
