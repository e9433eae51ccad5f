"""The synthetic CT holds something for a JEPA to predict, measured on the files written.

* The lung away from the nodule predicts the nodule's size and density (diffuse findings
  share causes with the nodule), partly — not all of it.
* The nodule lies off-centre, inside the view, across >= 2 patches on every axis of the
  default 4×4×4 patch grid, so masks can leave part of it in the context.
* Under ``structure="independent"`` the EHR says nothing about the diffuse findings.
* The files do not depend on how many processes wrote them.

Patch features are computed on the HU volume cut into the 4×4×4 grid: the default 40³
volume splits into 10³-voxel blocks, exactly the voxels each 8³ patch of the data module's
32³ resize is made from.
"""

from __future__ import annotations

import filecmp

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_score

from data_modules.synthetic import CohortSpec, feature_names, generate_cohort
from data_modules.synthetic.render import FOV_MARGIN_MM, LOBE_AMPLITUDE, PATCH_GRID
from jepa_lightning.masking import JEPAMaskCollator

G = PATCH_GRID
N_PATIENTS = 200


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple:
    """200 internal patients at the default volume and spacing."""
    root = tmp_path_factory.mktemp("content") / "c"
    generate_cohort(root, CohortSpec(n_patients=N_PATIENTS, n_external=0, seed=5), progress=False)
    df = pd.read_parquet(root / "manifest.parquet").merge(
        pd.read_parquet(root / "latents.parquet"), on="scan_id"
    )
    return root, df


def _patch_edges(img: nib.Nifti1Image) -> list[np.ndarray]:
    """World-mm patch boundaries along x, y, z (the view split into ``G`` equal parts)."""
    spacing = np.abs(np.diag(img.affine)[:3])
    lo = img.affine[:3, 3] - spacing / 2
    hi = lo + spacing * np.asarray(img.shape)
    return [np.linspace(lo[a], hi[a], G + 1) for a in range(3)]


def _ball_patches(edges: list[np.ndarray], centre: np.ndarray, radius: float) -> np.ndarray:
    """bool ``[G, G, G]`` (x, y, z): patches whose box meets the ball."""
    lo = np.stack(np.meshgrid(*[e[:-1] for e in edges], indexing="ij"), -1)
    hi = np.stack(np.meshgrid(*[e[1:] for e in edges], indexing="ij"), -1)
    return np.linalg.norm(np.clip(centre, lo, hi) - centre, axis=-1) < radius


def _centre(row: pd.Series) -> np.ndarray:
    return row[["nodule_x", "nodule_y", "nodule_z"]].to_numpy(np.float64)


def _body_radius(row: pd.Series) -> float:
    """The lobulated body always covers this ball."""
    return (1 - LOBE_AMPLITUDE) * row["radius_mm"]


def _context_features(vol: np.ndarray, nodule: np.ndarray) -> np.ndarray:
    """Mean, std, share < -920 HU and share > -750 HU of each patch the nodule does not
    touch, averaged over those patches."""
    b = [s // G for s in vol.shape]
    feats = []
    for i, j, k in zip(*np.nonzero(~nodule), strict=True):
        p = vol[i * b[0] : (i + 1) * b[0], j * b[1] : (j + 1) * b[1], k * b[2] : (k + 1) * b[2]]
        feats.append([p.mean(), p.std(), (p < -920).mean(), (p > -750).mean()])
    return np.mean(feats, axis=0)


def _cv_r2(x: np.ndarray, y: np.ndarray) -> float:
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    model = RidgeCV(alphas=np.logspace(-3, 3, 13))
    folds = KFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, x, y, cv=folds, scoring="r2").mean())


def test_lung_away_from_the_nodule_predicts_its_size_and_density(cohort):
    root, df = cohort
    feats = []
    for _, row in df.iterrows():
        img = nib.load(root / row["image"])
        # Conservative: every patch the nodule's spikes could reach (plus 1 mm) is left out.
        nodule = _ball_patches(_patch_edges(img), _centre(row), row["nodule_reach_mm"] + 1.0)
        assert (~nodule).sum() >= 4, row["scan_id"]  # the largest central nodules leave 7
        feats.append(_context_features(np.asarray(img.dataobj, np.float64), nodule))
    x = np.asarray(feats)
    r2 = {k: _cv_r2(x, df[k].to_numpy(np.float64)) for k in ("radius_mm", "density_hu")}
    # Measured at seed 5: radius 0.52, density 0.54 (the review's centred cohort: 0.09, -0.15).
    assert min(r2.values()) >= 0.3, r2
    assert max(r2.values()) < 0.9, r2  # partial information, not a copy of the nodule


def test_nodule_is_off_centre_inside_the_view_and_spans_two_patches_per_axis(cohort):
    root, df = cohort
    roi = df[["roi_x", "roi_y", "roi_z"]].to_numpy()
    assert np.allclose(roi, df[["nodule_x", "nodule_y", "nodule_z"]].to_numpy())
    assert roi.std(0).min() > 3.0  # off-centre, spread on every axis (mm)
    for _, row in df.iterrows():
        img = nib.load(root / row["image"])
        edges, c = _patch_edges(img), _centre(row)
        for a in range(3):
            assert edges[a][0] + FOV_MARGIN_MM <= c[a] - row["nodule_reach_mm"], row["scan_id"]
            assert c[a] + row["nodule_reach_mm"] <= edges[a][-1] - FOV_MARGIN_MM, row["scan_id"]
            # At least 1 mm of the body on each side of a patch boundary.
            lo, hi = c[a] - _body_radius(row) + 1.0, c[a] + _body_radius(row) - 1.0
            inner = edges[a][1:-1]
            assert np.any((inner > lo) & (inner < hi)), (row["scan_id"], a)
        # The ROI is where the nodule is: its core has the nodule's density.
        vol = np.asarray(img.dataobj, np.float64)
        voxel = np.linalg.inv(img.affine) @ np.r_[roi[row.name], 1.0]
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), -1)
        mm = np.abs(np.diag(img.affine)[:3])
        core = np.linalg.norm((grid - voxel[:3]) * mm, axis=-1) < 0.5 * row["radius_mm"]
        assert abs(np.median(vol[core]) - row["density_hu"]) < 60.0, row["scan_id"]


def _no_nodule_in_context_share(nodule: torch.Tensor, batch_size: int = 32, **masking) -> float:
    """Share of samples, in batches with an image context, whose context holds no nodule
    patch. ``nodule`` is bool ``[N, 64]`` in the collator's raster (z, y, x) order.

    Batches of the ``ehr_to_image`` mode (the full EHR predicts the image: no image context
    by design, ``p_ehr_only`` of them) are left out: no image placement can help there.
    """
    torch.manual_seed(0)
    collator = JEPAMaskCollator(grid=(G, G, G), n_ehr_features=32, rank=0, **masking)
    pick = torch.Generator().manual_seed(1)
    misses = []
    while len(misses) < 4000:
        ctx = collator.masks(batch_size)["ctx_image_idx"]
        if ctx.shape[1] == 0:
            continue
        rows = torch.randint(0, len(nodule), (batch_size,), generator=pick)
        misses += (~torch.gather(nodule[rows], 1, ctx).any(1)).tolist()
    return float(np.mean(misses))


def test_masks_leave_part_of_the_nodule_in_the_context(cohort):
    root, df = cohort
    edges = _patch_edges(nib.load(root / df["image"].iloc[0]))
    nodule = torch.tensor(
        np.stack(
            [
                _ball_patches(edges, _centre(row), _body_radius(row)).transpose(2, 1, 0).ravel()
                for _, row in df.iterrows()
            ]
        )
    )
    defaults = _no_nodule_in_context_share(nodule)
    smaller = _no_nodule_in_context_share(nodule, n_blocks=4, block_scale=(0.1, 0.15))
    # Measured: defaults 0.25, n_blocks=4 block_scale=(0.1, 0.15) 0.13 (centred nodule: 0.57
    # with defaults, counting ehr_to_image batches).
    assert smaller < 0.2, (defaults, smaller)
    assert defaults < 0.35, (defaults, smaller)


FINDINGS = ("lung_density_hu", "emphysema_fraction", "ground_glass_fraction", "vessel_radius_mm")


def _ehr_r2(structure: str, tmp_path) -> dict[str, float]:
    """Cross-validated R² of each diffuse finding from the EHR vector (mean-imputed)."""
    spec = CohortSpec(n_patients=240, n_external=0, volume_shape=(8, 8, 8), structure=structure)
    root = tmp_path / structure
    generate_cohort(root, spec, progress=False)
    df = pd.read_parquet(root / "manifest.parquet").merge(
        pd.read_parquet(root / "latents.parquet"), on="scan_id"
    )
    x = df[feature_names(spec.n_ehr_features)].to_numpy(np.float64)
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    return {k: _cv_r2(x, df[k].to_numpy(np.float64)) for k in FINDINGS}


def test_structure_knob_decides_whether_ehr_knows_the_diffuse_findings(tmp_path):
    shared, independent = _ehr_r2("shared", tmp_path), _ehr_r2("independent", tmp_path)
    # Measured (seed 0): shared 0.16 / 0.33 / 0.29 / 0.20, independent -0.07 .. -0.02.
    assert min(shared.values()) > 0.1 and np.mean(list(shared.values())) > 0.2, shared
    assert max(independent.values()) < 0.05, independent


def test_files_do_not_depend_on_the_number_of_workers(tmp_path):
    spec = CohortSpec(n_patients=40, n_external=30, volume_shape=(12, 12, 12), seed=2)
    one, two = tmp_path / "one", tmp_path / "two"
    generate_cohort(one, spec, progress=False, workers=1)
    generate_cohort(two, spec, progress=False, workers=2)
    for name in ("manifest.parquet", "latents.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / name), pd.read_parquet(two / name))
    images = sorted(p.name for p in (one / "images").iterdir())
    assert len(images) == 70 and images == sorted(p.name for p in (two / "images").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(one / "images", two / "images", images, False)
    assert not mismatch and not errors
