"""What an LIDC cohort is before any file is read: its settings, its EHR columns, its label.

The columns are known here, without the database, so the CLI can size a model from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

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


SCAN_FEATURES = ("n_readers", "slice_thickness_mm", "pixel_spacing_mm", "contrast")


def ehr_feature_names() -> list[str]:
    """The EHR columns, in manifest order (known before the cohort is built, so the CLI can
    size the model from them)."""
    readers = [f"ehr_{name}_r{r + 1}" for name in RATINGS for r in range(MAX_READERS)]
    return readers + [f"ehr_{name}" for name in SCAN_FEATURES]


def median_rating(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def malignancy_label(ratings: Sequence[float]) -> float:
    """NoduleMNIST3D: median < 3 benign (0), > 3 malignant (1), exactly 3 unlabelled (NaN)."""
    m = median_rating(ratings)
    return 0.0 if m < 3 else 1.0 if m > 3 else float("nan")
