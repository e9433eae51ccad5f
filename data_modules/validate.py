"""Check a whole archive before training: ``python -m data_modules.validate MANIFEST [--ehr TABLE]``.

Runs every check of the data contract that does not need the voxels — columns and types,
duplicate ``scan_id``, patients in two splits, labels, EHR values, ROI columns — then opens
every image's *header* (NIfTI) or every slice header (DICOM folder): present, readable,
3-D, spacing, orientation, and, for ``.nii.gz``, a truncation check (gzip's stored length
against the header's data size, read from the file's last 4 bytes: no decompression). With
``--decode`` each volume is also decoded (NaN/inf voxels, corrupt data): slow but complete.

Prints a report (counts, each problem with its rows, spacing/size/orientation summary) and
exits non-zero when anything is wrong, so it can gate a training job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_modules.cell_values import DAY_ORIGIN, parse_column
from data_modules.dicom import geometry as dicom_geometry
from data_modules.ehr_table import (
    KEYS,
    LOW_MATCH_WARNING,
    ehr_table_features,
    join_ehr,
    read_ehr_table,
)
from data_modules.manifest import (
    ROI_COLUMNS,
    SERIES_COLUMN,
    ManifestError,
    RowProblems,
    assign_patient_splits,
    ehr_columns,
    read_table,
    resolve_image_paths,
    validate_manifest,
)
from data_modules.readers import BadSampleError, LoadCTd, dicom_volume, is_dicom_path
from data_modules.roi import ROI_SPACE_COLUMN, ROI_SPACE_HINT, ROI_SPACES
from data_modules.roi_check import check_roi
from data_modules.split_summary import format_summary, split_summary, summary_warnings


@dataclass
class ImageInfo:
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    problem: str | None = None
    note: str = ""  # DICOM: the series picked in a folder of several, files ignored
    ignored: int = 0  # DICOM: files that are not images (DICOMDIR, reports, non-DICOM)


@dataclass
class Report:
    manifest: str
    n_rows: int = 0
    counts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how something was read: no action needed
    split_table: str = ""  # the split preview (Markdown)
    images: dict[str, ImageInfo] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        good = [i for i in self.images.values() if i.problem is None and i.shape is not None]
        out: dict[str, Any] = {
            "manifest": self.manifest,
            "ok": self.ok,
            "rows": self.n_rows,
            **self.counts,
            "n_problems": len(self.problems),
            "problems": self.problems,
            "warnings": self.warnings,
            "notes": self.notes,
            "split_table": self.split_table,
        }
        if good:
            sp = np.array([i.spacing for i in good], dtype=float)
            sh = np.array([i.shape for i in good], dtype=float)
            out["spacing_mm"] = {
                axis: {"min": float(sp[:, a].min()), "median": float(np.median(sp[:, a])), "max": float(sp[:, a].max())}
                for a, axis in enumerate("xyz")
            }  # fmt: skip
            out["size_voxels"] = {
                axis: {"min": int(sh[:, a].min()), "median": float(np.median(sh[:, a])), "max": int(sh[:, a].max())}
                for a, axis in enumerate("xyz")
            }  # fmt: skip
            out["orientation"] = dict(Counter(i.orientation for i in good).most_common())
        return out

    def markdown(self) -> str:
        s = self.summary()
        lines = [f"# Archive check: {self.manifest}", ""]
        lines.append(f"**{'OK' if self.ok else 'PROBLEMS FOUND'}** — {s['rows']} rows")
        for key in (
            "patients",
            "images_checked",
            "labelled",
            "splits",
            "cohorts",
            "ehr_features",
            "ehr_rows_matched",
            "rois_checked",
            "ehr_read_as",
            "dicom_non_image_files_ignored",
        ):
            if key in s:
                lines.append(f"- {key}: {s[key]}")
        if "spacing_mm" in s:
            lines += ["", "| axis | spacing min | median | max (mm) | size min | median | max |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for a in "xyz":
                sp, sz = s["spacing_mm"][a], s["size_voxels"][a]
                lines.append(
                    f"| {a} | {sp['min']:.3g} | {sp['median']:.3g} | {sp['max']:.3g} | "
                    f"{sz['min']} | {sz['median']:.0f} | {sz['max']} |"
                )
            lines.append(f"\norientation (axis codes): {s['orientation']}")
        if self.split_table:
            lines += ["", "## Splits (what training will print)", "", self.split_table]
        if self.notes:
            lines += ["", f"## {len(self.notes)} note(s)", ""]
            lines += [f"- {n}" for n in self.notes[:50]]
            if len(self.notes) > 50:
                lines.append(f"- ... and {len(self.notes) - 50} more (see --json)")
        if self.warnings:
            lines += ["", f"## {len(self.warnings)} warning(s)", ""]
            lines += [f"- {w}" for w in self.warnings[:200]]
        if self.problems:
            lines += ["", f"## {len(self.problems)} problem(s)", ""]
            lines += [f"- {p}" for p in self.problems[:200]]
            if len(self.problems) > 200:
                lines.append(f"- ... and {len(self.problems) - 200} more (see --json)")
        return "\n".join(lines)


def nifti_header_info(path: Path) -> ImageInfo:
    """Shape, spacing, orientation from the header; truncation from gzip's stored length."""
    try:
        img = nib.load(str(path))
    except Exception as err:
        return ImageInfo(problem=f"image {path} could not be read as NIfTI ({err})")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        return ImageInfo(problem=f"image {path} has shape {shape}; a 3-D CT volume is required")
    hdr = img.header
    if str(path).endswith(".gz"):
        # A loaded header may report offset 0; a single file's data starts at >= 352 (NIfTI-1).
        offset = max(int(hdr.get_data_offset()), int(getattr(hdr, "single_vox_offset", 0)))
        expected = offset + int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            stored = int.from_bytes(fh.read(4), "little")
        if stored != expected % 2**32:
            return ImageInfo(
                problem=f"image {path} is truncated or corrupt (gzip holds {stored} bytes, the "
                f"header needs {expected}); re-export or re-copy it"
            )
    zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms) or not np.isfinite(img.affine).all():
        return ImageInfo(
            problem=f"image {path} has voxel spacing {zooms} / a non-finite affine; fix its header"
        )
    return ImageInfo(shape=shape, spacing=zooms, orientation="".join(nib.aff2axcodes(img.affine)))


def dicom_header_info(path: Path, series_uid: str | None = None) -> ImageInfo:
    """Shape, spacing, orientation of a DICOM series folder or Enhanced CT file, after every
    header-only check of :mod:`data_modules.dicom` (modality, localizer, orientation, slice
    count and spacing, gantry tilt, matrix size / pixel spacing / bit depth of every slice,
    a missing decoder for its compression), with the series chosen in a folder of several
    and the non-image files ignored (``note``, ``ignored``)."""
    try:
        headers = dicom_volume(path, series_uid)
    except BadSampleError as err:
        return ImageInfo(problem=str(err))
    shape, spacing, affine = dicom_geometry(headers)
    orientation = "".join(nib.aff2axcodes(affine))
    return ImageInfo(shape, spacing, orientation, note=headers.note, ignored=headers.ignored)


def check_archive(
    manifest: str | Path,
    ehr_table: str | None = None,
    ehr_join: str = "scan_id",
    ehr_cols: list[str] | None = None,
    decode: bool = False,
    progress: bool = True,
    roi_space: str | None = None,
) -> Report:
    """Every check, collecting problems instead of stopping at the first.

    With ``decode``, each ROI centre is also looked up in its decoded scan
    (:mod:`data_modules.roi_check`): a centre in air, lung parenchyma or outside the body is
    a warning, and a problem when the mirrored (LPS <-> RAS) reading lands in tissue."""
    report = Report(str(manifest))
    try:
        df = read_table(manifest)
    except ManifestError as err:
        report.problems.append(str(err))
        return report
    report.n_rows = len(df)
    names: list[str] = []
    ehr_failed = False  # then "no EHR feature column" would be a knock-on, not the cause
    try:
        names = ehr_columns(list(df.columns), None if ehr_table else ehr_cols)
        if ehr_table is not None:
            df, names = _join_ehr_table(report, df, str(manifest), ehr_table, ehr_join, ehr_cols)
    except ManifestError as err:  # the EHR table is unusable; the manifest is still checked
        report.problems.append(str(err))
        ehr_failed = True
    problems = RowProblems()
    table_problems: list[str] = []
    df["_row"] = np.arange(len(df))  # the user's row numbers, kept through dropped rows
    try:
        clean = validate_manifest(
            df, str(manifest), names, "skip", problems, table_problems, roi_space
        )
    except ManifestError as err:  # no image column: nothing further can be checked
        report.problems.append(str(err))
        return report
    report.problems += table_problems
    report.problems += problems.reasons
    report.counts.update(
        patients=int(clean["patient_id"].nunique()),
        labelled=int(clean["label"].notna().sum()),
        cohorts=clean["cohort"].value_counts().to_dict(),
        ehr_features=len(names),
    )
    if "split" in clean.columns:
        report.counts["splits"] = clean["split"].value_counts().to_dict()
    preview_splits(report, clean)
    kinds = read_as(df, clean, names)
    if kinds:
        report.counts["ehr_read_as"] = kinds
    if not names and not ehr_failed:
        report.problems.append(
            f"manifest {manifest} has no EHR feature column (ehr_* or --ehr TABLE); "
            "CTEHRDataModule needs at least one"
        )
    clean["image_path"] = resolve_image_paths(clean, manifest)
    loader = LoadCTd("image") if decode else None
    paths = clean["image_path"].tolist()
    rois = row_rois(clean)
    series = clean[SERIES_COLUMN].tolist() if SERIES_COLUMN in clean else [None] * len(clean)
    decoded: tuple[str, Any] | None = None  # the last decoded volume (rows of a scan)
    for i, path in enumerate(tqdm(paths, desc="checking images", disable=not progress)):
        p = Path(path)
        row = f"row {int(clean['_row'].iloc[i])} (scan_id={clean['scan_id'].iloc[i]!r})"
        key = f"{path}::{series[i]}" if series[i] else path  # a folder's series each
        if key in report.images:
            info = report.images[key]
        elif not p.exists():
            info = ImageInfo(problem=f"image {p} does not exist: fix the manifest's 'image' entry")
        elif is_dicom_path(p):
            info = dicom_header_info(p, series[i])
            if info.note:
                report.notes.append(f"{row}: {info.note}")
            if info.ignored:
                report.counts["dicom_non_image_files_ignored"] = (
                    report.counts.get("dicom_non_image_files_ignored", 0) + info.ignored
                )
        else:
            info = nifti_header_info(p)
        if info.problem is None and loader is not None and (decoded or ("",))[0] != key:
            decoded = None
            try:
                decoded = (key, loader.load(p, series[i]))
            except BadSampleError as err:
                info = ImageInfo(problem=str(err))
        report.images[key] = info
        if info.problem is not None:
            report.problems.append(f"{row}: {info.problem}")
        elif decoded is not None and decoded[0] == key and rois[i] is not None:
            report.counts["rois_checked"] = report.counts.get("rois_checked", 0) + 1
            message, space_wrong = check_roi(decoded[1], *rois[i])
            if message is not None:
                (report.problems if space_wrong else report.warnings).append(f"{row}: {message}")
    report.counts["images_checked"] = len(report.images)
    return report


def preview_splits(report: Report, clean: pd.DataFrame) -> None:
    """The split summary training will print (:mod:`data_modules.split_summary`), and its
    warnings; without a split column, the splits CTEHRDataModule draws by default."""
    table = clean
    if "split" not in clean.columns:
        table = clean.assign(split=assign_patient_splits(clean, 0.15, 0.15, 0))
        report.notes.append(
            "no split column: the preview shows the splits CTEHRDataModule draws by default "
            "(val_fraction 0.15, test_fraction 0.15, split_seed 0, by patient)"
        )
    if table.empty:
        return
    summary = split_summary(table)
    report.split_table = format_summary(summary)
    report.warnings += summary_warnings(summary)


def read_as(raw: pd.DataFrame, clean: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """The EHR columns that are not plain numbers: dates (as days) and categories (with the
    values seen; training fits its own on the train split), so the user sees how each
    column will be read before training."""
    out: dict[str, Any] = {}
    dates = [n for n in names if n in raw and parse_column(raw[n], n).kind == "date"]
    if dates:
        out[f"dates (days since {DAY_ORIGIN.date()})"] = dates
    cats = {
        n: sorted(clean[n].dropna().unique().tolist())[:20]
        for n in names
        if n in clean and not pd.api.types.is_numeric_dtype(clean[n])
    }
    if cats:
        out["categorical (codes fitted on train)"] = cats
    return out


def row_rois(clean) -> list[tuple[tuple[float, ...], str] | None]:
    """Each row's (ROI centre, space), or None for a row without a usable one."""
    if not all(c in clean.columns for c in ROI_COLUMNS) or ROI_SPACE_COLUMN not in clean:
        return [None] * len(clean)
    out: list[tuple[tuple[float, ...], str] | None] = []
    for roi, space in zip(
        clean[list(ROI_COLUMNS)].to_numpy(dtype=float), clean[ROI_SPACE_COLUMN], strict=True
    ):
        ok = space in ROI_SPACES and np.isfinite(roi).all()
        out.append((tuple(float(v) for v in roi), space) if ok else None)
    return out


def _join_ehr_table(
    report: Report,
    df,
    manifest: str,
    ehr_table: str,
    ehr_join: str,
    ehr_cols: list[str] | None,
):
    """The manifest with the EHR table joined, and the feature names; a join that matches
    no scan is a problem (``validate`` exits 1), a low match a warning."""
    names = ehr_columns(list(df.columns), None)
    extra = ehr_table_features(ehr_table, ehr_join, None)
    if ehr_cols is not None:
        names = [c for c in ehr_cols if c in df.columns]
        extra = [c for c in ehr_cols if c not in df.columns]
        ehr_table_features(ehr_table, ehr_join, extra)  # each must exist
    table = read_ehr_table(ehr_table, ehr_join, extra)
    joined, match = join_ehr(df, table, ehr_join, extra, ehr_table, manifest, on_no_match="report")
    report.counts["ehr_rows_matched"] = (
        f"{match.fraction:.1%} of scans have an EHR record ({match.matched} of {match.total})"
    )
    if match.total and match.matched == 0:
        report.problems.append(match.describe(manifest, ehr_table))
    elif match.fraction < LOW_MATCH_WARNING:
        report.warnings.append(match.describe(manifest, ehr_table))
    return joined, names + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.validate",
        description="Check a CT + EHR archive against the data contract before training.",
    )
    parser.add_argument("manifest", help="manifest table (.csv or .parquet)")
    parser.add_argument("--ehr", help="EHR table joined onto the manifest (.csv or .parquet)")
    parser.add_argument("--ehr-join", choices=list(KEYS), default="scan_id")
    parser.add_argument("--ehr-columns", nargs="+", help="EHR feature columns (default: all)")
    parser.add_argument(
        "--roi-space",
        choices=list(ROI_SPACES),
        help="coordinate space of roi_x/y/z for every row (or a roi_space column): "
        + ROI_SPACE_HINT,
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="also decode every volume (slow) and report the HU at each ROI centre",
    )
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = check_archive(
        args.manifest, args.ehr, args.ehr_join, args.ehr_columns, args.decode,
        not args.no_progress, args.roi_space,
    )  # fmt: skip
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.summary(), indent=2, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
