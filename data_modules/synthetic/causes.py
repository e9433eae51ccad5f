"""Each patient's latent causes and what follows from them: label, nodule, diffuse findings.

See :mod:`data_modules.synthetic` for the causal structure. Everything here is a function
of the spec and the patient's own random stream, so a patient is the same whichever process
draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_modules.synthetic.spec import CohortSpec


@dataclass
class World:
    """Parameters shared by every patient: EHR loadings and feature coding."""

    shared_loadings: np.ndarray  # [n_shared, F]
    ehr_only_loadings: np.ndarray  # [n_ehr_only, F]
    coding_shift_features: np.ndarray  # bool [F]: features whose coding differs by site


def make_world(spec: CohortSpec) -> World:
    """The cohort's shared parameters, from its seed alone, so every process draws the same."""
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


# The nodule over time. Volume doubling times (days): malignant nodules double in 100–400
# days (log-uniform), benign ones are stable (half of them) or double in 600–3000 days.
MALIGNANT_DOUBLING_DAYS = (100.0, 400.0)
BENIGN_DOUBLING_DAYS = (600.0, 3000.0)
BENIGN_STABLE_SHARE = 0.5


def doubling_time(
    rng: np.random.Generator, truth: int, growth_signal: float, prevalence: float
) -> tuple[float, bool]:
    """The nodule's volume doubling time in days (``inf``: stable) and whether it follows
    the label.

    With probability ``growth_signal`` it is drawn from the distribution of the patient's
    class (``truth``); otherwise from the label-independent mixture that picks the malignant
    distribution with probability ``prevalence`` (the site's), so at ``growth_signal`` 0
    growth says nothing about the label and at any value the doubling times' overall
    distribution is about the same. Four uniforms are drawn whatever the settings, so a
    patient's draws never move with ``growth_signal``.
    """
    u_follow, u_class, u_stable, u_position = rng.random(4)
    follows = bool(u_follow < growth_signal)
    malignant = truth == 1 if follows else bool(u_class < prevalence)
    if malignant:
        lo, hi = MALIGNANT_DOUBLING_DAYS
    elif u_stable < BENIGN_STABLE_SHARE:
        return math.inf, follows
    else:
        lo, hi = BENIGN_DOUBLING_DAYS
    return float(lo * (hi / lo) ** u_position), follows


def scan_days(rng: np.random.Generator, spec: CohortSpec) -> np.ndarray:
    """A patient's scan times in days since its first scan, ascending: a uniform number of
    scans in ``spec.scans_per_patient``, gaps uniform in ``spec.scan_interval_days``."""
    lo, hi = spec.scans_per_patient
    n = int(rng.integers(lo, hi + 1))
    gaps = rng.uniform(*spec.scan_interval_days, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def nodule_at(nodule: dict[str, float], t_rel: float, doubling_days: float) -> dict[str, float]:
    """The nodule ``-t_rel`` days before the latest scan (``t_rel <= 0``), where it is
    ``nodule``: the volume halves every ``doubling_days``, so the radius is
    ``r * 2 ** (t_rel / (3 * doubling_days))``; the spikes shrink with it, the density stays."""
    scale = 2.0 ** (t_rel / (3.0 * doubling_days))
    return {
        **nodule,
        "radius_mm": nodule["radius_mm"] * scale,
        "spiculation": nodule["spiculation"] * scale,
    }
