"""From a patient's causes to files' content: the CT volume (HU, mm) and the EHR vector.

The CT is lung parenchyma over the whole view (baseline density, texture, ground glass,
emphysema, vessels, each set by a patient-level finding), a lobulated, optionally spiculated
nodule placed off-centre (see :func:`nodule_centre` for the rule), scanner noise and the
site's HU offset. :func:`render_lung`, :func:`centred_grid` and :func:`as_ct` are also the
LIDC cohort's background and geometry (:mod:`data_modules.lidc.render`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from data_modules.synthetic.causes import World
from data_modules.synthetic.spec import NAMED_FEATURES, CohortSpec, SiteShift

SPIKE_MM = 4.0  # how far a fully spiculated nodule's spikes reach beyond its body
LOBE_AMPLITUDE = 0.08  # relative radius variation of the lobulated body
PATCH_GRID = 4  # patches per axis on the default 32³ / patch-8 grid (the placement rule's grid)
FOV_MARGIN_MM = 1.5  # the whole nodule, spikes included, stays this far inside the view
PATCH_OVERLAP_MM = 1.5  # the body reaches at least this far into each of >= 2 patches per axis


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float | tuple[float, ...]
) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise (FFT); ``sigma_vox`` per axis or for all."""
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (len(shape),))
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    kernel = np.exp(-2 * math.pi**2 * sum((s * f) ** 2 for s, f in zip(sig, freqs, strict=True)))
    axes = tuple(range(len(shape)))
    out = np.fft.irfftn(np.fft.rfftn(noise, axes=axes) * kernel, s=shape, axes=axes)
    return (out - out.mean()) / (out.std() + 1e-8)


def _soft_share(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray, share: float
) -> np.ndarray:
    """Weights in [0, 1] that are ~1 on about ``share`` of the volume, in smooth blobs: a
    smooth Gaussian field thresholded at its ``1 - share`` quantile, with a soft edge."""
    field = smooth_noise(rng, shape, sigma_vox)
    threshold = NormalDist().inv_cdf(1 - min(max(share, 1e-4), 1 - 1e-4))
    return 1 / (1 + np.exp(-(field - threshold) / 0.15))


def render_lung(
    rng: np.random.Generator,
    findings: dict[str, float],
    pts: np.ndarray,
    spacing: np.ndarray,
    fov: np.ndarray,
) -> np.ndarray:
    """Parenchyma over the whole view in HU: baseline density + texture, ground glass,
    emphysema and vessels, each set by a patient-level finding. Blob sizes are in mm, so a
    scanner with other voxels sees the same anatomy."""
    shape = pts.shape[:3]
    vol = findings["lung_density_hu"] + 20.0 * smooth_noise(rng, shape, 1.5 / spacing)
    gg = _soft_share(rng, shape, 4.0 / spacing, findings["ground_glass_fraction"])
    vol = vol + 170.0 * gg
    emph = _soft_share(rng, shape, 2.0 / spacing, findings["emphysema_fraction"])
    vol = vol * (1 - emph) + (-965.0 + 10.0 * rng.standard_normal(shape)) * emph
    for _ in range(rng.integers(5, 7)):  # vessels: cylinders through the field of view
        p0 = rng.uniform(-fov / 3, fov / 3)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        rel = pts - p0
        dist = np.linalg.norm(rel - (rel @ d)[..., None] * d, axis=-1)
        r = findings["vessel_radius_mm"] * rng.uniform(0.85, 1.15)
        vessel = 1 / (1 + np.exp((dist - r) / 0.35))
        vol = vol * (1 - vessel) + 40.0 * vessel
    return vol


def nodule_reach_mm(nodule: dict[str, float]) -> float:
    """An upper bound on how far the nodule (lobes, spikes, soft edge) reaches from its centre."""
    return nodule["radius_mm"] * (1 + LOBE_AMPLITUDE) + SPIKE_MM * nodule["spiculation"] + 1.0


def spans_two_patches(lo: float, hi: float, edges: np.ndarray) -> bool:
    """Whether ``[lo, hi]`` crosses a patch boundary with ``PATCH_OVERLAP_MM`` on each side."""
    inner = edges[1:-1]
    return bool(np.any((inner - lo >= PATCH_OVERLAP_MM) & (hi - inner >= PATCH_OVERLAP_MM)))


def nodule_centre(
    rng: np.random.Generator, nodule: dict[str, float], fov_lo: np.ndarray, fov_hi: np.ndarray
) -> np.ndarray:
    """A random centre (world mm) that keeps the whole nodule inside the view with a margin
    and makes its body span at least two patches of the ``PATCH_GRID`` grid on every axis.

    Uniform over the allowed positions (64 candidates, first allowed one). Along an axis too
    short for the nodule (tiny test volumes, a narrow external view) the centre is the
    view's centre and the nodule is cut by the view's edge.
    """
    reach = nodule_reach_mm(nodule)
    body = nodule["radius_mm"] * (1 - LOBE_AMPLITUDE)
    lo, hi = fov_lo + reach + FOV_MARGIN_MM, fov_hi - reach - FOV_MARGIN_MM
    fits = lo <= hi
    candidates = rng.uniform(np.where(fits, lo, 0), np.where(fits, hi, 0), (64, 3))
    middle = (fov_lo + fov_hi) / 2
    edges = [np.linspace(fov_lo[a], fov_hi[a], PATCH_GRID + 1) for a in range(3)]
    for c in candidates:
        if all(
            not fits[a] or spans_two_patches(c[a] - body, c[a] + body, edges[a]) for a in range(3)
        ):
            return np.where(fits, c, middle)
    # Not reached for the radius range above (a 9.2 mm body always spans two 12.5 mm
    # patches); kept so that a narrow view never loops: the boundary nearest the middle.
    return np.where(fits, np.clip([e[PATCH_GRID // 2] for e in edges], lo, hi), middle)


def nodule_shape(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The nodule's spike directions (unit vectors, ``[9, 3]``) and lobe phase."""
    spikes = rng.standard_normal((9, 3))
    spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
    return spikes, float(rng.uniform(0, 6.3))


def add_nodule(
    rng: np.random.Generator | tuple[np.ndarray, float],
    vol: np.ndarray,
    pts: np.ndarray,
    centre: np.ndarray,
    nodule: dict,
) -> np.ndarray:
    """The lobulated, optionally spiculated nodule blended into ``vol`` at ``centre``; its
    shape is drawn from ``rng``, or given (:func:`nodule_shape`) to draw the same nodule at
    another size."""
    spikes, phase = nodule_shape(rng) if isinstance(rng, np.random.Generator) else rng
    rel = pts - centre
    dist = np.linalg.norm(rel, axis=-1) + 1e-6
    unit = rel / dist[..., None]
    spike_field = np.minimum((np.clip(unit @ spikes.T, 0, None) ** 24).sum(-1), 1.0)
    angle = np.arctan2(unit[..., 1], unit[..., 0])
    lobes = LOBE_AMPLITUDE * np.sin(3 * angle + phase)
    boundary = nodule["radius_mm"] * (1 + lobes) + SPIKE_MM * nodule["spiculation"] * spike_field
    inside = 1 / (1 + np.exp((dist - boundary) / 0.5))
    return vol * (1 - inside) + nodule["density_hu"] * inside


def centred_grid(
    shape: tuple[int, int, int], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The world position (mm) of every voxel centre of a view centred on the origin
    (``[*shape, 3]``), the view's extent (mm) and its first voxel's centre: renderers work
    in mm, so a scanner with other voxels sees the same anatomy."""
    fov = spacing * np.asarray(shape)
    origin = -fov / 2 + spacing / 2
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1), fov, origin


def as_ct(
    vol: np.ndarray, spacing: np.ndarray, origin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``vol`` rounded into a CT file's int16 HU range and the affine of its grid."""
    vol = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return vol, affine


def render_ct(
    rng: np.random.Generator,
    nodule: dict[str, float],
    findings: dict[str, float],
    spec: CohortSpec,
    site: SiteShift,
    earlier: Sequence[tuple[dict[str, float], np.random.Generator]] = (),
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """A patient's volumes in HU (int16, (x, y, z)), earliest first, their affine, and the
    nodule centre in world mm.

    The last volume is the latest scan: anatomy, nodule placement and shape and scanner
    noise all from ``rng``. ``earlier`` gives each earlier scan's nodule (the same one at
    another size, :func:`~data_modules.synthetic.causes.nodule_at`) and the stream of its
    scanner noise: the same anatomy, the nodule at the same centre with the same shape, fresh
    noise. The centre is placed for the latest (largest) nodule, so a smaller earlier one
    may span a single patch.
    """
    shape = spec.volume_shape
    spacing = np.asarray(site.spacing, dtype=np.float64)
    pts, fov, origin = centred_grid(shape, spacing)

    lung = render_lung(rng, findings, pts, spacing, fov)
    centre = nodule_centre(rng, nodule, -fov / 2, fov / 2)
    look = nodule_shape(rng)

    noise_sd = spec.image_noise_hu * site.noise_scale
    vols = []
    for scan_nodule, noise_rng in [*earlier, (nodule, rng)]:
        vol = add_nodule(look, lung, pts, centre, scan_nodule)
        vol = vol + site.hu_offset + noise_sd * noise_rng.standard_normal(shape)
        vol, affine = as_ct(vol, spacing, origin)
        vols.append(vol)
    return vols, affine, centre


def ehr_vector(
    rng: np.random.Generator,
    causes: dict[str, np.ndarray],
    spec: CohortSpec,
    world: World,
    site: SiteShift,
) -> np.ndarray:
    """Clinical-unit EHR values (NaN = missing) from shared and EHR-only causes."""
    shared = causes.get("ehr_side", causes["shared"])
    latent = shared @ world.shared_loadings + causes["ehr_only"] @ world.ehr_only_loadings
    latent = latent + spec.ehr_noise * rng.standard_normal(spec.n_ehr_features)
    latent = latent + site.ehr_shift * world.coding_shift_features
    values = latent.copy()
    for j, (_, kind, loc, scale) in enumerate(NAMED_FEATURES):
        if kind == "cont":
            values[j] = loc + scale * latent[j]
        elif kind == "count":
            values[j] = float(np.round(np.exp(loc + scale * latent[j] * 0.5)))
        else:
            values[j] = float(latent[j] > loc)
    missing = rng.random(spec.n_ehr_features) < spec.ehr_missing_rate
    missing[0] = False  # age is always recorded
    values[missing] = np.nan
    return values
