"""The synthetic environment's scenario knobs do what their names say, measured on the files
the generator writes (not on its internals)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from data_modules.synthetic import (
    MAX_EXTERNAL_SHIFT,
    CohortSpec,
    ExternalShift,
    SiteShift,
    ensure_cohort,
    external_site,
    feature_names,
    generate_cohort,
)
from jepa_lightning.main import main

SMALL = dict(n_patients=200, n_external=0, n_ehr_features=16, volume_shape=(20, 20, 20))
SPLIT = 100  # first half fits, second half evaluates


def _load(root):
    manifest = pd.read_parquet(root / "manifest.parquet")
    latents = pd.read_parquet(root / "latents.parquet")
    return manifest.merge(latents, on="scan_id")


def _ehr_matrix(df: pd.DataFrame, n_features: int) -> np.ndarray:
    x = df[feature_names(n_features)].to_numpy(np.float64)
    return np.where(np.isnan(x), np.nanmean(x, axis=0), x)


def _standardise(x: np.ndarray) -> np.ndarray:
    mu, sd = x[:SPLIT].mean(0), x[:SPLIT].std(0) + 1e-8
    return (x - mu) / sd


def _heldout_r2(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> float:
    """R^2 on the second half of a ridge regression fitted on the first half."""
    x = np.c_[_standardise(x), np.ones(len(x))]
    a, b = x[:SPLIT], y[:SPLIT]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ b)
    resid = y[SPLIT:] - x[SPLIT:] @ w
    return float(1 - resid.var() / y[SPLIT:].var())


def _heldout_auroc(x: np.ndarray, y: np.ndarray) -> float:
    """AUROC on the second half of an L2 logistic regression fitted on the first half."""
    xt = torch.tensor(_standardise(x), dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(xt.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = xt[:SPLIT] @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[:SPLIT])
        loss = loss + 1e-2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = xt[SPLIT:] @ w[:-1] + w[-1]
    return float(binary_auroc(scores, yt[SPLIT:].long()))


def _image_features(root, df: pd.DataFrame) -> np.ndarray:
    """What an image-only model can see: HU statistics of the central region of each scan."""
    feats = []
    for path in df["image"]:
        vol = np.asarray(nib.load(root / path).dataobj, dtype=np.float64)
        c = [s // 2 for s in vol.shape]
        row = []
        for half in (3, 6):
            core = vol[
                c[0] - half : c[0] + half, c[1] - half : c[1] + half, c[2] - half : c[2] + half
            ]
            row += [core.mean(), core.std(), (core > -500).mean(), (core > -200).mean()]
        feats.append(row)
    return np.asarray(feats)


@pytest.fixture(scope="module")
def independent_ehr_label(tmp_path_factory):
    """No shared causes; the label comes only from EHR-only causes."""
    root = tmp_path_factory.mktemp("knobs") / "independent"
    spec = CohortSpec(**SMALL, structure="independent", label_weights=(0.0, 0.0, 1.0), seed=3)
    generate_cohort(root, spec, progress=False)
    return root, _load(root)


@pytest.fixture(scope="module")
def shared_image_label(tmp_path_factory):
    """The default structure; the label comes only from image-only causes (positive control)."""
    root = tmp_path_factory.mktemp("knobs") / "shared"
    spec = CohortSpec(**SMALL, structure="shared", label_weights=(0.0, 1.0, 0.0), seed=3)
    generate_cohort(root, spec, progress=False)
    return root, _load(root)


def _image_causes(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(("shared_", "image_only_"))] + [
        "radius_mm",
        "density_hu",
        "spiculation",
    ]


def test_independent_structure_ehr_says_nothing_about_image_causes(independent_ehr_label):
    _, df = independent_ehr_label
    x = _ehr_matrix(df, SMALL["n_ehr_features"])
    r2 = {c: _heldout_r2(x, df[c].to_numpy()) for c in _image_causes(df)}
    assert max(r2.values()) < 0.15 and np.mean(list(r2.values())) < 0.03, r2
    corr = np.corrcoef(np.c_[x, df[_image_causes(df)].to_numpy()], rowvar=False)
    cross = corr[: x.shape[1], x.shape[1] :]
    assert np.abs(cross).mean() < 0.1, np.abs(cross).mean()
    # ... while the EHR does carry its own side's causes (how strongly each one depends on
    # the random sparse loadings, so the best-carried one is the positive control).
    sides = [c for c in df.columns if c.startswith("ehr_side_")]
    assert max(_heldout_r2(x, df[c].to_numpy()) for c in sides) > 0.5


def test_shared_structure_ehr_predicts_shared_causes(shared_image_label):
    _, df = shared_image_label
    x = _ehr_matrix(df, SMALL["n_ehr_features"])
    shared = [c for c in df.columns if c.startswith("shared_")]
    assert max(_heldout_r2(x, df[c].to_numpy()) for c in shared) > 0.5
    assert "ehr_side_0" not in df.columns


def test_label_in_ehr_only_causes_leaves_image_model_at_chance(independent_ehr_label):
    root, df = independent_ehr_label
    y = df["true_label"].to_numpy()
    image_auroc = _heldout_auroc(_image_features(root, df), y)
    ehr_auroc = _heldout_auroc(_ehr_matrix(df, SMALL["n_ehr_features"]), y)
    assert abs(image_auroc - 0.5) < 0.12, image_auroc
    assert ehr_auroc > 0.7, ehr_auroc


def test_label_in_image_only_causes_is_visible_to_image_model(shared_image_label):
    root, df = shared_image_label
    y = df["true_label"].to_numpy()
    assert _heldout_auroc(_image_features(root, df), y) > 0.62


@pytest.fixture(scope="module")
def image_signal_cohorts(tmp_path_factory):
    """The same patients with the label's image evidence in both parts, the nodule, the lung."""
    base = tmp_path_factory.mktemp("image_signal")
    out = {}
    for signal in ("both", "local", "global"):
        spec = CohortSpec(**{**SMALL, "n_patients": 150}, image_signal=signal, seed=5)
        generate_cohort(base / signal, spec, progress=False, workers=1)
        out[signal] = _load(base / signal)
    return out


def _nodule_and_lung_r2(df: pd.DataFrame) -> tuple[float, float]:
    """Held-out R² of the image-side causes' label summary from the nodule's size, density and
    spiculation, and from the diffuse findings (what each part of the image shows)."""
    causes = df[[c for c in df.columns if c.startswith(("shared_", "image_only_"))]].to_numpy()
    target = causes.sum(1)
    nodule = df[["radius_mm", "density_hu", "spiculation"]].to_numpy()
    lung = df[
        ["lung_density_hu", "emphysema_fraction", "ground_glass_fraction", "vessel_radius_mm"]
    ].to_numpy()
    return _heldout_r2(nodule, target), _heldout_r2(lung, target)


def test_image_signal_puts_the_causes_in_the_nodule_or_the_lung(image_signal_cohorts):
    r2 = {k: _nodule_and_lung_r2(df) for k, df in image_signal_cohorts.items()}
    (both_nodule, both_lung), (local_nodule, local_lung), (global_nodule, global_lung) = (
        r2["both"],
        r2["local"],
        r2["global"],
    )
    assert both_nodule > 0.3 and both_lung > 0.3, r2
    assert local_nodule > 0.3 and local_lung < 0.1, r2
    assert global_nodule < 0.1 and global_lung > 0.3, r2
    # The label, the EHR and the other part's values come from the same patients' draws:
    # "local" keeps the default nodule, "global" the default findings, bit for bit.
    both, local, glob = (image_signal_cohorts[k] for k in ("both", "local", "global"))
    assert both["true_label"].equals(local["true_label"]) and both["true_label"].equals(
        glob["true_label"]
    )
    assert both["radius_mm"].equals(local["radius_mm"])
    assert both["emphysema_fraction"].equals(glob["emphysema_fraction"])
    ehr = feature_names(SMALL["n_ehr_features"])
    pd.testing.assert_frame_equal(both[ehr], glob[ehr])


def test_ehr_missing_rate_is_the_measured_missing_share(tmp_path):
    spec = CohortSpec(
        n_patients=60, n_external=0, n_ehr_features=20, ehr_missing_rate=0.4, volume_shape=(8, 8, 8)
    )
    generate_cohort(tmp_path / "c", spec, progress=False)
    df = pd.read_parquet(tmp_path / "c" / "manifest.parquet")
    names = feature_names(20)
    assert df["ehr_age"].notna().all()  # age is always recorded
    measured = df[names[1:]].isna().to_numpy().mean()
    assert abs(measured - 0.4) < 0.05, measured


def test_external_shift_strengths_interpolate_between_sites():
    assert external_site(ExternalShift(0, 0, 0, 0, 0)) == SiteShift()
    assert external_site(ExternalShift(1, 1, 1, 1, 1)) == MAX_EXTERNAL_SHIFT
    half = external_site(ExternalShift(hu=0.5, noise=0, spacing=0, ehr=0, prevalence=0))
    assert half.hu_offset == 60.0 and half.noise_scale == 1.0 and half.spacing == (1.0, 1.0, 1.25)
    # The defaults are the external cohort the quickstart has always used.
    assert CohortSpec().external == SiteShift(60.0, 1.6, (0.8, 0.8, 2.0), 0.5, 0.45)


def test_hu_shift_strength_moves_the_external_scans_mean_hu(tmp_path):
    site = external_site(ExternalShift(hu=1.0, noise=0, spacing=0, ehr=0, prevalence=0))
    spec = CohortSpec(
        n_patients=20, n_external=20, volume_shape=(16, 16, 16), external=site, test_fraction=0.5
    )
    generate_cohort(tmp_path / "c", spec, progress=False)
    df = pd.read_parquet(tmp_path / "c" / "manifest.parquet")
    means = {
        cohort: np.mean(
            [np.asarray(nib.load(tmp_path / "c" / p).dataobj).mean() for p in g["image"]]
        )
        for cohort, g in df.groupby("cohort")
    }
    assert abs(means["external"] - means["internal"] - 120.0) < 25.0, means


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(structure="causal"), "structure='causal'"),
        (dict(ehr_missing_rate=1.0), "ehr_missing_rate"),
        (dict(label_weights=(0.0, 0.0, 0.0)), "label_weights"),
        (dict(label_weights=(1.0, -1.0, 0.0)), "label_weights"),
        (dict(image_signal="texture"), "image_signal='texture'"),
    ],
)
def test_bad_knob_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CohortSpec(**kwargs)


def test_bad_shift_strength_is_refused_by_name():
    with pytest.raises(ValueError, match=r"external_shift.noise=1.5"):
        ExternalShift(noise=1.5)


def test_cohort_written_before_the_knobs_existed_is_still_accepted(tmp_path):
    spec = CohortSpec(n_patients=4, n_external=0, volume_shape=(8, 8, 8))
    root = tmp_path / "c"
    generate_cohort(root, spec, progress=False)
    info = json.loads((root / "cohort.json").read_text())
    del info["spec"]["structure"]  # as written by an older version
    (root / "cohort.json").write_text(json.dumps(info))
    assert ensure_cohort(root, spec) == root / "manifest.parquet"
    with pytest.raises(FileExistsError, match="structure"):
        ensure_cohort(root, CohortSpec(**{**spec.__dict__, "structure": "independent"}))


def test_knobs_are_yaml_keys(tmp_path, capsys):
    argv = [
        "fit",
        "--config=experiments/quickstart/pretrain.yaml",
        "--data.init_args.structure=independent",
        "--data.init_args.ehr_missing_rate=0.3",
        "--data.init_args.external_shift.hu=0.9",
        "--data.init_args.label_weights=[0.0, 0.5, 0.5]",
        "--data.init_args.image_signal=global",
        "--print_config",
    ]
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert "structure: independent" in out and "hu: 0.9" in out and "ehr_missing_rate: 0.3" in out
    assert "image_signal: global" in out
