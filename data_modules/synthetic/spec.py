"""The settings that determine a synthetic cohort, and the names of its EHR features.

Kept free of numerics and files so the data module and the CLI can size a model and
compare a saved cohort's settings without rendering anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

STRUCTURES = ("shared", "independent")
# Where the image carries the label ("Pretext Matters": JEPAs are expected to win when the
# signal is global, invariance methods when it is local): both the nodule and the diffuse
# findings follow the causes (the default), only the nodule (local), or only the findings
# (global). The uninformative part is still drawn, from causes of its own.
IMAGE_SIGNALS = ("both", "local", "global")
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
    # Over time (the defaults write one scan per patient, the cohort of before these knobs):
    scans_per_patient: tuple[int, int] = (1, 1)  # uniform number of scans, both inclusive
    scan_interval_days: tuple[float, float] = (90.0, 540.0)  # gap between consecutive scans
    growth_signal: float = 0.0  # share of patients whose nodule grows as its label says
    image_signal: str = "both"  # which part of the image follows the causes (IMAGE_SIGNALS)

    @property
    def longitudinal(self) -> bool:
        """Whether a patient can have more than one scan."""
        return self.scans_per_patient[1] > 1

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
        if self.image_signal not in IMAGE_SIGNALS:
            raise ValueError(f"image_signal={self.image_signal!r}: choose one of {IMAGE_SIGNALS}")
        if len(self.label_weights) != 3 or min(self.label_weights) < 0:
            raise ValueError(
                f"label_weights={self.label_weights}: give three non-negative weights "
                "(shared, image_only, ehr_only)"
            )
        if sum(self.label_weights) == 0:
            raise ValueError("label_weights are all 0: the label would carry no signal")
        scans, gaps = tuple(self.scans_per_patient), tuple(self.scan_interval_days)
        if len(scans) != 2 or any(int(n) != n for n in scans) or not 1 <= scans[0] <= scans[1]:
            raise ValueError(
                f"scans_per_patient={self.scans_per_patient}: give (min, max) whole numbers "
                "with 1 <= min <= max"
            )
        if len(gaps) != 2 or not 0 < gaps[0] <= gaps[1]:
            raise ValueError(
                f"scan_interval_days={self.scan_interval_days}: give (min, max) days "
                "with 0 < min <= max"
            )
        if not 0 <= self.growth_signal <= 1:
            raise ValueError(f"growth_signal={self.growth_signal} must be in [0, 1]")
        # As tuples of ints / floats, so a YAML list or [90, 540] compares equal to the default.
        object.__setattr__(self, "scans_per_patient", tuple(int(n) for n in scans))
        object.__setattr__(self, "scan_interval_days", tuple(float(d) for d in gaps))

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, comparable with a file


def feature_names(n_features: int) -> list[str]:
    names = [f"ehr_{n}" for n, *_ in NAMED_FEATURES]
    names += [f"ehr_sig_{i:02d}" for i in range(n_features - len(NAMED_FEATURES))]
    return names
