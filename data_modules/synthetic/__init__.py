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

``image_signal`` moves the label's image evidence ("Pretext Matters"): ``"local"`` keeps it
in the nodule alone (the diffuse findings follow causes of their own), ``"global"`` in the
diffuse findings alone (the nodule's size, density and spiculation follow causes of their
own); the default ``"both"`` is the cohort described above.

``latents.parquet`` records every cause, the label's probability, the nodule (centre
``nodule_x/y/z``, ``radius_mm``, ``density_hu``, ``spiculation``, ``nodule_reach_mm``) and
each finding's value, for checks and studies. The EHR vector holds clinical-signature-like
features (age, pack-years, labs, diagnoses, latent signatures) with values missing at
random. Each patient's image and EHR are drawn from their own random streams seeded by
(seed, cohort, index), so a cohort is the same for any number of generating processes.

Over time (``scans_per_patient``, default one scan): each patient has a uniform number of
scans ``scan_interval_days`` apart, with one anatomy and nodule centre, fresh scanner noise
and a fresh EHR record each; only the latest scan (today's one-scan scan) carries the label.
Earlier scans show the nodule smaller by its volume doubling time: malignant 100–400 days,
benign stable or 600–3000 days for the share ``growth_signal`` of patients, a
label-independent mixture of the two for the others (:func:`.causes.doubling_time`).

Two cohorts: ``internal`` (train/val/test by patient; only ``labeled_fraction`` of training
patients carry a label — the rest is the unlabelled archive) and ``external`` (test only,
all labelled) with a site shift: HU offset, more noise, another voxel spacing, EHR coding
shift and another prevalence. :class:`ExternalShift` dials each of these from 0 (the
external site is a copy of the internal one) to 1 (:data:`MAX_EXTERNAL_SHIFT`).

Run ``python -m data_modules.synthetic --root data/cohort [--workers N]`` or let
:class:`SyntheticCohortDataModule` generate it on first use.

The parts, one job each: :mod:`.spec` (the settings), :mod:`.causes` (each patient's
latent causes and what follows from them), :mod:`.render` (causes -> CT volume and EHR
vector), :mod:`.cohort` (the files, and the command line), :mod:`.datamodule`.
"""

from data_modules.synthetic.cohort import bayes_ceiling, ensure_cohort, generate_cohort
from data_modules.synthetic.datamodule import SyntheticCohortDataModule
from data_modules.synthetic.spec import (
    MAX_EXTERNAL_SHIFT,
    CohortSpec,
    ExternalShift,
    SiteShift,
    external_site,
    feature_names,
)

__all__ = [
    "bayes_ceiling",
    "MAX_EXTERNAL_SHIFT",
    "CohortSpec",
    "ExternalShift",
    "SiteShift",
    "SyntheticCohortDataModule",
    "ensure_cohort",
    "external_site",
    "feature_names",
    "generate_cohort",
]
