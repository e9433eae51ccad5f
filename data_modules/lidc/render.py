"""From the readers' contours to a CT crop: rasterisation, the consensus mask, the volume.

Masks are rasterised at the scan's real pixel and slice spacing; the crop's parenchyma is
the synthetic cohort's (:func:`data_modules.synthetic.render.render_lung`), so the LIDC and
synthetic volumes differ in the nodule only.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.path import Path as Polygon
from scipy.ndimage import distance_transform_edt, gaussian_filter

from data_modules.lidc.database import NoduleJob
from data_modules.lidc.spec import LIDCSpec, median_rating
from data_modules.synthetic.causes import diffuse_findings
from data_modules.synthetic.render import as_ct, centred_grid, render_lung, smooth_noise

# Median texture rating (1 ground glass, 3 part solid, 5 solid) -> nodule attenuation in HU.
TEXTURE_HU = {1: -620.0, 2: -450.0, 3: -280.0, 4: -120.0, 5: 20.0}
CALCIFIED_HU = 450.0
CALCIFICATION_ABSENT = 6  # LIDC's calcification scale: 1-5 are patterns, 6 is "absent"
FINDING_KEYS = ("lung_density", "emphysema", "ground_glass", "vessel")


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
    pts, fov, origin = centred_grid(shape, spacing)
    drivers = {k: float(rng.standard_normal()) for k in FINDING_KEYS}
    vol = render_lung(rng, diffuse_findings(drivers), pts, spacing, fov)

    texture = int(round(median_rating(job.annotations["texture"])))
    calcification = int(round(median_rating(job.annotations["calcification"])))
    density = TEXTURE_HU[min(max(texture, 1), 5)] + 15.0 * smooth_noise(rng, shape, 1.0 / spacing)
    if calcification != CALCIFICATION_ABSENT and consensus.any():
        depth = distance_transform_edt(consensus, sampling=spacing)
        # Pattern 3 ("solid") calcifies the whole nodule; the others a central core.
        core = consensus if calcification == 3 else depth >= 0.5 * depth.max()
        density = np.where(core, CALCIFIED_HU, density)
    inside = _soft(consensus, spacing)
    vol = vol * (1 - inside) + density * inside
    vol = vol + spec.noise_hu * rng.standard_normal(shape)
    vol, affine = as_ct(vol, spacing, origin)
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
