"""Synthetic CT + EHR cohort: the embedded default data, written to disk as real files.

Causal structure, per patient (all standard normal):

* ``shared`` causes drive both the CT (nodule and diffuse findings) and the EHR vector,
* ``image_only`` causes drive only the image, ``ehr_only`` causes only the EHR,
* the malignancy label comes from all three groups through a logistic link, with the share
  of the logit's variance given by ``label_weights = (shared, image_only, ehr_only)``.

``structure="independent"`` removes every shared cause: the image side and the EHR side each
draw their own copy of the "shared" causes, and the label's shared share is split evenly
between the two copies. The label is then a sum of independent causal variables, and
neither modality says anything about the other's causes — the regime in which the
multimodal JEPA paper expects cross-modal prediction to teach the encoder nothing useful.

The CT (saved as int16 NIfTI in HU with a true affine, spacing in mm) is a field of view of
lung with something for a JEPA to predict from one part of the image about another:

* **diffuse, patient-level findings over the whole view** — baseline lung density,
  emphysema-like low-attenuation blobs near -965 HU (area share 0–35 %), ground-glass
  regions raised by 170 HU (0–30 %) and vessel calibre (0.6–2.6 mm) — each a monotone
  function of a mixture of the image-side causes (``shared`` and ``image_only``) plus its
  own noise (:data:`FINDING_MIXTURES`). The mixtures overlap the nodule's drivers, so the
  lung far from the nodule carries part, not all, of the nodule's size and density and of
  the label (ridge R² ~0.5 for both from patches the nodule does not touch). Why: with
  texture independent between patches, image → image prediction taught nothing about the
  nodule (R² 0.09 / -0.15 before).
* **a nodule off-centre** at a random position, wholly inside the view with a margin,
  whose radius (5–12 mm), density (ground glass .. solid) and spiculation are functions of
  the causes. Its body spans at least two patches on every axis of the default 4×4×4 patch
  grid (32³ input, patch 8), so a JEPA mask can leave part of it in the context (a centred
  nodule was covered by every target block on a 4³ grid). ``roi_x/y/z`` is its true centre.
  Where a view is too narrow for the nodule (the external site's smaller voxels, tiny test
  volumes) it sits at the view's centre along that axis, cut by the edges.
* scanner noise and the site's HU offset.

``latents.parquet`` records every cause, the label's probability, the nodule (centre
``nodule_x/y/z``, ``radius_mm``, ``density_hu``, ``spiculation``, ``nodule_reach_mm``) and
each finding's value, for checks and studies. The EHR vector holds clinical-signature-like
features (age, pack-years, labs, diagnoses, latent signatures) with values missing at
random. Each patient's image and EHR are drawn from their own random streams seeded by
(seed, cohort, index), so a cohort is the same for any number of generating processes.

Two cohorts: ``internal`` (train/val/test by patient; only ``labeled_fraction`` of training
patients carry a label — the rest is the unlabelled archive) and ``external`` (test only,
all labelled) with a site shift: HU offset, more noise, another voxel spacing, EHR coding
shift and another prevalence. :class:`ExternalShift` dials each of these from 0 (the
external site is a copy of the internal one) to 1 (:data:`MAX_EXTERNAL_SHIFT`).

Run ``python -m data_modules.synthetic --root data/cohort [--workers N]`` or let
:class:`SyntheticCohortDataModule` generate it on first use.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data_modules.atomic_folder import written_atomically
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTAugment, CTPreprocess

FORMAT_VERSION = 2  # 2: diffuse findings, off-centre nodule
STRUCTURES = ("shared", "independent")
NAMED_FEATURES = [  # (name, kind, location, scale)
    ("age", "cont", 65.0, 8.0),
    ("pack_years", "count", 3.0, 0.6),
    ("bmi", "cont", 27.0, 4.0),
    ("fev1_pct", "cont", 80.0, 15.0),
    ("crp", "count", 1.5, 0.7),
    ("hba1c", "cont", 5.8, 0.7),
    ("copd_dx", "binary", 0.5, 0.0),
    ("emphysema_dx", "binary", 0.8, 0.0),
    ("prior_cancer_dx", "binary", 1.2, 0.0),
    ("family_history_lung_ca", "binary", 1.0, 0.0),
]


@dataclass(frozen=True)
class SiteShift:
    """How a cohort's scanner and coding differ from the internal site."""

    hu_offset: float = 0.0
    noise_scale: float = 1.0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.25)
    ehr_shift: float = 0.0
    prevalence: float = 0.3


@dataclass(frozen=True)
class ExternalShift:
    """Strength, 0..1, of each way the external site differs from the internal one.

    0 makes that aspect of the external site identical to the internal site; 1 moves it
    all the way to :data:`MAX_EXTERNAL_SHIFT`. The defaults (0.5 each) give the external
    cohort the quickstart has always used.

    Args:
        hu: scanner calibration offset (0 .. +120 HU).
        noise: image noise (1x .. 2.2x the internal scanner's).
        spacing: voxel spacing ((1, 1, 1.25) mm .. (0.6, 0.6, 2.75) mm).
        ehr: coding shift added to a third of the EHR features (0 .. 1 latent sd).
        prevalence: malignancy prevalence (the internal 0.3 .. 0.6).
    """

    hu: float = 0.5
    noise: float = 0.5
    spacing: float = 0.5
    ehr: float = 0.5
    prevalence: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"external_shift.{name}={value}: each strength must be in [0, 1]")


MAX_EXTERNAL_SHIFT = SiteShift(
    hu_offset=120.0, noise_scale=2.2, spacing=(0.6, 0.6, 2.75), ehr_shift=1.0, prevalence=0.6
)


def external_site(shift: ExternalShift, internal: SiteShift | None = None) -> SiteShift:
    """The external site between ``internal`` (strength 0) and the maximal shift (1).

    Values are rounded to 6 decimals so that a cohort's saved settings compare equal to the
    same strengths asked for again.
    """
    a, b = internal or SiteShift(), MAX_EXTERNAL_SHIFT

    def lerp(x: float, y: float, t: float) -> float:
        return round(x + t * (y - x), 6)

    return SiteShift(
        hu_offset=lerp(a.hu_offset, b.hu_offset, shift.hu),
        noise_scale=lerp(a.noise_scale, b.noise_scale, shift.noise),
        spacing=tuple(lerp(x, y, shift.spacing) for x, y in zip(a.spacing, b.spacing, strict=True)),
        ehr_shift=lerp(a.ehr_shift, b.ehr_shift, shift.ehr),
        prevalence=lerp(a.prevalence, b.prevalence, shift.prevalence),
    )


@dataclass(frozen=True)
class CohortSpec:
    """Everything that determines a synthetic cohort; saved as ``cohort.json`` beside it."""

    n_patients: int = 400
    n_external: int = 150
    labeled_fraction: float = 0.25
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    n_ehr_features: int = 32
    ehr_missing_rate: float = 0.15
    ehr_noise: float = 0.7
    n_shared: int = 3
    n_image_only: int = 2
    n_ehr_only: int = 2
    label_weights: tuple[float, float, float] = (0.7, 0.2, 0.1)
    signal_strength: float = 2.5
    volume_shape: tuple[int, int, int] = (40, 40, 40)
    image_noise_hu: float = 25.0
    internal: SiteShift = field(default_factory=SiteShift)
    external: SiteShift = field(default_factory=lambda: external_site(ExternalShift()))
    seed: int = 0
    structure: str = "shared"

    def __post_init__(self) -> None:
        if self.n_ehr_features < len(NAMED_FEATURES):
            raise ValueError(f"n_ehr_features must be >= {len(NAMED_FEATURES)}")
        if self.n_shared < 3 or self.n_image_only < 2 or self.n_ehr_only < 1:
            raise ValueError("need n_shared >= 3, n_image_only >= 2 and n_ehr_only >= 1")
        if not 0 <= self.labeled_fraction <= 1:
            raise ValueError("labeled_fraction must be in [0, 1]")
        if not 0 <= self.ehr_missing_rate < 1:
            raise ValueError(f"ehr_missing_rate={self.ehr_missing_rate} must be in [0, 1)")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}: choose one of {STRUCTURES}")
        if len(self.label_weights) != 3 or min(self.label_weights) < 0:
            raise ValueError(
                f"label_weights={self.label_weights}: give three non-negative weights "
                "(shared, image_only, ehr_only)"
            )
        if sum(self.label_weights) == 0:
            raise ValueError("label_weights are all 0: the label would carry no signal")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, comparable with a file


def feature_names(n_features: int) -> list[str]:
    names = [f"ehr_{n}" for n, *_ in NAMED_FEATURES]
    names += [f"ehr_sig_{i:02d}" for i in range(n_features - len(NAMED_FEATURES))]
    return names


@dataclass
class World:
    """Parameters shared by every patient: EHR loadings and feature coding."""

    shared_loadings: np.ndarray  # [n_shared, F]
    ehr_only_loadings: np.ndarray  # [n_ehr_only, F]
    coding_shift_features: np.ndarray  # bool [F]: features whose coding differs by site


def make_world(spec: CohortSpec) -> World:
    rng = np.random.default_rng([spec.seed, 999])
    f = spec.n_ehr_features

    def sparse_loadings(n_causes: int) -> np.ndarray:
        w = rng.uniform(0.5, 1.0, (n_causes, f)) * rng.choice([-1.0, 1.0], (n_causes, f))
        return w * (rng.random((n_causes, f)) < 0.4)

    shared, ehr_only = sparse_loadings(spec.n_shared), sparse_loadings(spec.n_ehr_only)
    return World(shared, ehr_only, rng.random(f) < 0.33)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def patient_causes(rng: np.random.Generator, spec: CohortSpec) -> dict[str, np.ndarray]:
    """Standard-normal causes. Under the independent structure the EHR side gets its own
    draw (``ehr_side``) in place of the ``shared`` causes, which then reach the image only."""
    causes = {
        "shared": rng.standard_normal(spec.n_shared),
        "image_only": rng.standard_normal(spec.n_image_only),
        "ehr_only": rng.standard_normal(spec.n_ehr_only),
    }
    if spec.structure == "independent":
        causes["ehr_side"] = rng.standard_normal(spec.n_shared)
    return causes


def label_logit(causes: dict[str, np.ndarray], spec: CohortSpec, prevalence: float) -> float:
    """Logit of malignancy: unit-variance summaries of each cause group, mixed by weight."""
    ws, wi, we = (max(0.0, w) for w in spec.label_weights)
    total = ws + wi + we or 1.0
    summary = {k: v.sum() / math.sqrt(len(v)) for k, v in causes.items()}
    if "ehr_side" in causes:  # independent: the shared share comes half from each side
        summary["shared"] = (summary["shared"] + summary["ehr_side"]) / math.sqrt(2)
    signal = (
        math.sqrt(ws / total) * summary["shared"]
        + math.sqrt(wi / total) * summary["image_only"]
        + math.sqrt(we / total) * summary["ehr_only"]
    )
    return spec.signal_strength * signal + _logit(prevalence)


NODULE_RADIUS_MM = (5.0, 12.0)
SPIKE_MM = 4.0  # how far a fully spiculated nodule's spikes reach beyond its body
LOBE_AMPLITUDE = 0.08  # relative radius variation of the lobulated body
PATCH_GRID = 4  # patches per axis on the default 32³ / patch-8 grid (the placement rule's grid)
FOV_MARGIN_MM = 1.5  # the whole nodule, spikes included, stays this far inside the view
PATCH_OVERLAP_MM = 1.5  # the body reaches at least this far into each of >= 2 patches per axis


def nodule_params(causes: dict[str, np.ndarray]) -> dict[str, float]:
    """Radius (mm), density (HU) and spiculation (0..1) from shared + image-only causes.

    The radius range (5–11 mm) gives a diameter of at least one default patch width (10 mm
    in-plane), so a nodule always spans two patches of the 4×4×4 grid along some placement
    and :func:`nodule_centre` can always find one that spans two along every axis.
    """
    s, i = causes["shared"], causes["image_only"]
    radius = float(np.clip(7.5 + 1.8 * (0.8 * s[0] + 0.6 * i[0]), *NODULE_RADIUS_MM))
    density = float(np.clip(-250.0 + 220.0 * (0.8 * s[1] + 0.6 * i[1]), -750.0, 80.0))
    spic = float(1 / (1 + math.exp(-1.8 * (0.8 * s[2] + 0.6 * (i[0] - i[1]) / math.sqrt(2)))))
    return {"radius_mm": radius, "density_hu": density, "spiculation": spic}


# Cause mixtures of the diffuse findings, as weights on (s0, s1, s2, i0, i1, own noise); each
# row has unit norm, so every driver is standard normal. They overlap the nodule's drivers
# (radius 0.8*s0 + 0.6*i0, density 0.8*s1 + 0.6*i1, spiculation s2 and i0 - i1) with
# correlations of 0.64–0.81 (together the four drivers explain ~0.77 of the radius driver's
# variance and ~0.72 of the density driver's), so the lung around the nodule tells a model
# part of the nodule's size and density (and of the label), but never all of it.
FINDING_MIXTURES: dict[str, tuple[float, ...]] = {
    "emphysema": (0.60, 0.0, 0.25, 0.50, 0.0, 0.50),  # ~ radius
    "vessel": (0.55, 0.20, 0.0, 0.45, 0.0, 0.60),  # ~ radius
    "lung_density": (-0.25, 0.60, 0.0, 0.0, 0.50, 0.55),  # ~ density
    "ground_glass": (0.0, 0.50, 0.35, 0.0, 0.40, 0.69),  # ~ density, spiculation
}


def finding_drivers(rng: np.random.Generator, causes: dict[str, np.ndarray]) -> dict[str, float]:
    """Standard-normal driver of each diffuse finding: its cause mixture plus its own noise.

    Only the image side's causes enter (``shared`` and ``image_only``), so under the
    independent structure the EHR, which sees ``ehr_side`` instead, knows nothing of them.
    """
    s, i = causes["shared"], causes["image_only"]
    basis = np.array([s[0], s[1], s[2], i[0], i[1]])
    drivers = {}
    for name, weights in FINDING_MIXTURES.items():
        w = np.asarray(weights) / np.linalg.norm(weights)
        drivers[name] = float(w[:5] @ basis + w[5] * rng.standard_normal())
    return drivers


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def diffuse_findings(drivers: dict[str, float]) -> dict[str, float]:
    """Patient-level findings, each a monotone function of its driver.

    * ``lung_density_hu``: the parenchyma's baseline attenuation (-915 .. -815 HU);
    * ``emphysema_fraction``: share of the lung in low-attenuation blobs near -965 HU (0–35 %);
    * ``ground_glass_fraction``: share in smooth regions raised by 170 HU (0–30 %);
    * ``vessel_radius_mm``: calibre of the vessels (0.6–2.6 mm).
    """
    return {
        "lung_density_hu": -865.0 + 25.0 * float(np.clip(drivers["lung_density"], -2, 2)),
        "emphysema_fraction": 0.35 * _sigmoid(1.4 * drivers["emphysema"] - 1.0),
        "ground_glass_fraction": 0.30 * _sigmoid(1.4 * drivers["ground_glass"] - 1.0),
        "vessel_radius_mm": float(np.clip(1.4 + 0.45 * drivers["vessel"], 0.6, 2.6)),
    }


def _smooth_noise(
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
    field = _smooth_noise(rng, shape, sigma_vox)
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
    vol = findings["lung_density_hu"] + 20.0 * _smooth_noise(rng, shape, 1.5 / spacing)
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


def add_nodule(
    rng: np.random.Generator, vol: np.ndarray, pts: np.ndarray, centre: np.ndarray, nodule: dict
) -> np.ndarray:
    """The lobulated, optionally spiculated nodule blended into ``vol`` at ``centre``."""
    rel = pts - centre
    dist = np.linalg.norm(rel, axis=-1) + 1e-6
    unit = rel / dist[..., None]
    spikes = rng.standard_normal((9, 3))
    spikes /= np.linalg.norm(spikes, axis=1, keepdims=True)
    spike_field = np.minimum((np.clip(unit @ spikes.T, 0, None) ** 24).sum(-1), 1.0)
    angle = np.arctan2(unit[..., 1], unit[..., 0])
    lobes = LOBE_AMPLITUDE * np.sin(3 * angle + rng.uniform(0, 6.3))
    boundary = nodule["radius_mm"] * (1 + lobes) + SPIKE_MM * nodule["spiculation"] * spike_field
    inside = 1 / (1 + np.exp((dist - boundary) / 0.5))
    return vol * (1 - inside) + nodule["density_hu"] * inside


def render_ct(
    rng: np.random.Generator,
    nodule: dict[str, float],
    findings: dict[str, float],
    spec: CohortSpec,
    site: SiteShift,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume in HU (int16, (x, y, z)), its affine, and the nodule centre in world mm."""
    shape = spec.volume_shape
    spacing = np.asarray(site.spacing, dtype=np.float64)
    fov = spacing * np.asarray(shape)
    origin = -fov / 2 + spacing / 2
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)  # world mm of each voxel centre

    vol = render_lung(rng, findings, pts, spacing, fov)
    centre = nodule_centre(rng, nodule, -fov / 2, fov / 2)
    vol = add_nodule(rng, vol, pts, centre, nodule)

    noise_sd = spec.image_noise_hu * site.noise_scale
    vol = vol + site.hu_offset + noise_sd * rng.standard_normal(shape)
    vol = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return vol, affine, centre


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


def patient_record(job: _Job, spec: CohortSpec, world: World, out_dir: Path) -> tuple[dict, dict]:
    """Render one patient, write its NIfTI under ``out_dir/images``, return its manifest and
    latents rows. A pure function of ``(spec, job)``: its random streams are seeded by
    ``(seed, cohort, index)``, so the result does not depend on which process runs it."""
    site = spec.internal if job.cohort == "internal" else spec.external
    key = [spec.seed, 0 if job.cohort == "internal" else 1, job.index]
    rng = np.random.default_rng(key)
    causes = patient_causes(rng, spec)
    p = 1 / (1 + math.exp(-label_logit(causes, spec, site.prevalence)))
    truth = int(rng.random() < p)
    # The image and the EHR draw from their own streams, so changing one never moves the other.
    image_rng, ehr_rng = np.random.default_rng([*key, 1]), np.random.default_rng([*key, 2])
    nodule = nodule_params(causes)
    findings = diffuse_findings(finding_drivers(image_rng, causes))
    vol, affine, centre = render_ct(image_rng, nodule, findings, spec, site)
    ehr = ehr_vector(ehr_rng, causes, spec, world, site)
    pid = f"{job.cohort[:3]}-{job.index:05d}"
    scan_id = f"{pid}-s0"
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, out_dir / "images" / f"{scan_id}.nii.gz")
    names = feature_names(spec.n_ehr_features)
    manifest = {
        "patient_id": pid,
        "scan_id": scan_id,
        "image": f"images/{scan_id}.nii.gz",
        "label": float(truth) if job.shown else np.nan,
        "cohort": job.cohort,
        "split": job.split,
        "scan_time": 0.0,
        "roi_x": centre[0],
        "roi_y": centre[1],
        "roi_z": centre[2],
        **dict(zip(names, ehr.tolist(), strict=True)),
    }
    latents = {
        "scan_id": scan_id,
        "true_label": truth,
        "p_malignant": p,
        **{f"shared_{k}": v for k, v in enumerate(causes["shared"])},
        **{f"image_only_{k}": v for k, v in enumerate(causes["image_only"])},
        **{f"ehr_only_{k}": v for k, v in enumerate(causes["ehr_only"])},
        **{f"ehr_side_{k}": v for k, v in enumerate(causes.get("ehr_side", []))},
        **nodule,
        "nodule_x": centre[0],
        "nodule_y": centre[1],
        "nodule_z": centre[2],
        "nodule_reach_mm": nodule_reach_mm(nodule),
        **findings,
    }
    return manifest, latents


_WORKER_STATE: tuple[CohortSpec, World, Path] | None = None


def _init_worker(spec: CohortSpec, world: World, out_dir: Path) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (spec, world, out_dir)


def _worker_record(job: _Job) -> tuple[dict, dict]:
    assert _WORKER_STATE is not None, "_init_worker was not run in this process"
    return patient_record(job, *_WORKER_STATE)


def default_workers() -> int:
    """Generation processes when none are asked for: two, or fewer on a smaller machine."""
    return min(2, os.cpu_count() or 1)


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


def _records(
    jobs: list[_Job], spec: CohortSpec, world: World, out_dir: Path, workers: int, progress: bool
):
    """Each job's records, in job order, from ``workers`` processes (in-process for 1).

    Small cohorts stay in-process (a pool per 32 patients at most): a pool costs more than
    it saves there. Workers fork where the platform can (they inherit the imported modules
    and start in milliseconds; spawned ones would re-import torch and Lightning).
    """
    workers = max(1, min(workers, math.ceil(len(jobs) / 32)))
    if multiprocessing.current_process().daemon:
        workers = 1  # a daemonic process (e.g. a loader worker) may not start children
    bar = dict(total=len(jobs), desc="synthetic cohort", disable=not progress)
    if workers == 1:
        yield from tqdm((patient_record(j, spec, world, out_dir) for j in jobs), **bar)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, world, out_dir)
    ) as pool:
        yield from tqdm(pool.map(_worker_record, jobs, chunksize=8), **bar)


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
        world = make_world(spec)
        n_workers = default_workers() if workers is None else workers
        records = list(_records(_jobs(spec), spec, world, tmp, n_workers, progress))
        pd.DataFrame([m for m, _ in records]).to_parquet(tmp / "manifest.parquet", index=False)
        pd.DataFrame([lat for _, lat in records]).to_parquet(tmp / "latents.parquet", index=False)
        (tmp / "cohort.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, "spec": spec.to_json()}, indent=2)
        )
    return root / "manifest.parquet"


def ensure_cohort(
    root: str | Path, spec: CohortSpec, progress: bool = True, workers: int | None = None
) -> Path:
    """The cohort at ``root``: reused when its ``cohort.json`` matches ``spec``, generated (by
    ``workers`` processes) when ``root`` is empty or absent, and never written over otherwise."""
    root = Path(root)
    info = root / "cohort.json"
    if info.exists():
        saved = json.loads(info.read_text())
        # Settings added after a cohort was written default to the behaviour it was written
        # with, so older cohorts stay valid.
        saved_spec = {**CohortSpec().to_json(), **saved.get("spec", {})}
        if saved_spec != spec.to_json() or saved.get("format_version") != FORMAT_VERSION:
            diff = {
                k: (saved_spec.get(k), v)
                for k, v in spec.to_json().items()
                if saved_spec.get(k) != v
            }
            raise FileExistsError(
                f"{root} holds a synthetic cohort generated with other settings "
                f"(saved vs requested: {diff}); point root at a new folder or delete it"
            )
        return root / "manifest.parquet"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no cohort.json: it is not a synthetic cohort; "
            "choose an empty or new folder"
        )
    return generate_cohort(root, spec, progress, workers)


class SyntheticCohortDataModule(CTEHRDataModule):
    """:class:`CTEHRDataModule` over a synthetic cohort, generated into ``root`` on first use.

    Args:
        root: cohort folder; generated when absent or empty, reused when its settings match.
        n_patients / n_external: internal and external cohort sizes (one scan per patient).
        labeled_fraction: share of internal training patients that carry a label.
        n_ehr_features: EHR vector length (>= 10).
        seed: cohort seed (the cohort is a deterministic function of the settings).
        label_weights: share of the label logit's variance from (shared, image-only,
            EHR-only) causes.
        structure: ``"shared"`` (image and EHR share causes) or ``"independent"`` (no
            shared cause: each modality has its own; see the module docstring).
        ehr_missing_rate: probability that an EHR value is missing (age never is).
        external_shift: strength 0..1 of each aspect of the external site's shift (HU
            offset, noise, voxel spacing, EHR coding, prevalence).
        image_size ... label_subset_seed: as in :class:`CTEHRDataModule` (the synthetic cohort
            always carries a split column, so the split fractions do not apply), including
            its preprocessing (``hu_window``, ``preprocess``), train-time ``augment``, disk
            ``cache_dir`` and ``streaming``: the synthetic cohort is the place to try them.
        generate_workers: processes that generate the cohort on first use (default
            :func:`default_workers`; the files do not depend on it). Not the loaders'
            ``num_workers``.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        n_patients: int = 400,
        n_external: int = 150,
        labeled_fraction: float = 0.25,
        n_ehr_features: int = 32,
        seed: int = 0,
        label_weights: tuple[float, float, float] = (0.7, 0.2, 0.1),
        structure: Literal["shared", "independent"] = "shared",
        ehr_missing_rate: float = 0.15,
        external_shift: ExternalShift | None = None,
        image_size: int | list[int] = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        hu_window: tuple[float, float] = (-1000.0, 400.0),
        require_labels: bool = False,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        cache_volumes: bool = True,
        drop_last: bool = True,
        preprocess: CTPreprocess | None = None,
        augment: CTAugment | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        stream_seed: int = 0,
        label_fraction: float = 1.0,
        label_subset_seed: int = 0,
        generate_workers: int | None = None,
    ):
        self.root = root
        self.generate_workers = generate_workers
        self.spec = CohortSpec(
            n_patients=n_patients,
            n_external=n_external,
            labeled_fraction=labeled_fraction,
            n_ehr_features=n_ehr_features,
            label_weights=tuple(label_weights),
            seed=seed,
            structure=structure,
            ehr_missing_rate=ehr_missing_rate,
            external=external_site(external_shift or ExternalShift()),
        )
        super().__init__(
            manifest=str(Path(root) / "manifest.parquet"),
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            on_bad_sample=on_bad_sample,
            hu_window=hu_window,
            require_labels=require_labels,
            predict_split=predict_split,
            cache_volumes=cache_volumes,
            drop_last=drop_last,
            preprocess=preprocess,
            augment=augment,
            cache_dir=cache_dir,
            streaming=streaming,
            stream_seed=stream_seed,
            label_fraction=label_fraction,
            label_subset_seed=label_subset_seed,
        )

    @property
    def ehr_feature_names(self) -> list[str]:
        return feature_names(self.spec.n_ehr_features)

    def latents(self) -> pd.DataFrame:
        """The generator's per-scan causes, nodule and findings (``latents.parquet``), indexed
        by ``scan_id``: ground truth for audits of what an encoder captured."""
        path = Path(self.root) / "latents.parquet"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: run prepare_data() (or generate the cohort) first"
            )
        return pd.read_parquet(path).set_index("scan_id")

    def prepare_data(self) -> None:
        ensure_cohort(self.root, self.spec, workers=self.generate_workers)

    def setup(self, stage: str | None = None) -> None:
        # A no-op when present; covers setup() without prepare_data().
        ensure_cohort(self.root, self.spec, workers=self.generate_workers)
        super().setup(stage)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT + EHR cohort to disk.")
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
    )
    path = ensure_cohort(args.root, spec, workers=args.workers)
    print(f"cohort ready: {path}")


if __name__ == "__main__":
    main()
