"""CTEHRDataModule, the manifest contract, bad input, splits and the synthetic generator."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.manifest import ManifestError, assign_patient_splits, validate_manifest
from data_modules.synthetic import (
    CohortSpec,
    SyntheticCohortDataModule,
    ensure_cohort,
    generate_cohort,
)
from data_modules.transforms import BadSampleError
from tests.conftest import TINY


def _dm(manifest, **kw) -> CTEHRDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 16)
    return CTEHRDataModule(manifest=str(manifest), **kw)


def _write(df: pd.DataFrame, root, name="manifest.csv"):
    path = root / name
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path, index=False)
    return path


@pytest.fixture
def manifest_df(cohort_copy) -> pd.DataFrame:
    return pd.read_parquet(cohort_copy / "manifest.parquet")


# --- the happy path -----------------------------------------------------------------------


def test_batches_follow_the_data_contract(tiny_cohort):
    dm = _dm(tiny_cohort / "manifest.parquet")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n_feat = TINY["n_ehr_features"]
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["ehr"].shape == (4, n_feat) and batch["ehr_missing"].dtype == torch.bool
    assert torch.equal(batch["ehr_missing"], torch.isnan(batch["ehr"]))
    assert batch["label"].shape == (4,)
    assert all(
        isinstance(batch[k], list) and len(batch[k]) == 4
        for k in ("patient_id", "scan_id", "cohort")
    )
    assert dm.n_ehr_features == n_feat


def test_csv_and_parquet_manifests_agree(tiny_cohort, tmp_path, manifest_df):
    manifest_df = manifest_df.assign(image=[str(tiny_cohort / p) for p in manifest_df["image"]])
    a, b = (
        _dm(_write(manifest_df, tmp_path, "m.csv")),
        _dm(_write(manifest_df, tmp_path, "m.parquet")),
    )
    a.setup("fit"), b.setup("fit")
    pd.testing.assert_frame_equal(a.split_table, b.split_table)
    np.testing.assert_allclose(a.dataset("train").ehr, b.dataset("train").ehr, equal_nan=True)


def test_ehr_normalised_with_training_statistics_only_and_missing_kept(tiny_cohort):
    dm = _dm(tiny_cohort / "manifest.parquet")
    dm.setup("fit")
    raw = pd.read_parquet(tiny_cohort / "manifest.parquet")
    cols = dm.ehr_feature_names
    train = raw[raw["split"] == "train"][cols].to_numpy(dtype=float)
    np.testing.assert_allclose(dm.ehr_stats["mean"], np.nanmean(train, 0), rtol=1e-5)
    # Statistics of the training split, so the training EHR is centred and val is not forced to be.
    assert np.nanmean(dm.dataset("train").ehr, 0) == pytest.approx(np.zeros(len(cols)), abs=1e-4)
    # Missing values are never imputed: NaN in, NaN (and a missing flag) out.
    val_raw = raw[raw["split"] == "val"][cols].to_numpy(dtype=float)
    assert np.isnan(val_raw).any()
    np.testing.assert_array_equal(np.isnan(dm.dataset("val").ehr), np.isnan(val_raw))


def test_ehr_statistics_round_trip_through_state_dict(tiny_cohort):
    dm = _dm(tiny_cohort / "manifest.parquet")
    dm.setup("fit")
    state = dm.state_dict()
    state["ehr_stats"]["mean"] = [m + 1.0 for m in state["ehr_stats"]["mean"]]
    before = dm.dataset("train").ehr.copy()
    dm.load_state_dict(state)
    after = dm.dataset("train").ehr
    ok = ~np.isnan(before)
    std = np.asarray(state["ehr_stats"]["std"], dtype=np.float32)
    np.testing.assert_allclose(
        (before - after)[ok], np.broadcast_to(1.0 / std, before.shape)[ok], rtol=1e-4
    )


def test_require_labels_trains_on_labelled_scans_only(tiny_cohort):
    dm = _dm(tiny_cohort / "manifest.parquet", require_labels=True)
    dm.setup("fit")
    assert dm.dataset("train").table["label"].notna().all()
    unlabelled = _dm(tiny_cohort / "manifest.parquet")
    unlabelled.setup("fit")
    assert len(unlabelled.dataset("train")) > len(dm.dataset("train"))


# --- splits --------------------------------------------------------------------------------


def test_patient_level_split_when_manifest_has_none(tiny_cohort, tmp_path, manifest_df):
    # Two scans per patient: a second copy of every row with another scan_id.
    df = manifest_df.drop(columns=["split"]).assign(
        image=[str(tiny_cohort / p) for p in manifest_df["image"]]
    )
    df2 = df.assign(scan_id=df["scan_id"] + "-b")
    dm = _dm(_write(pd.concat([df, df2]), tmp_path), val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    table = dm.split_table
    assert list(table.columns) == ["scan_id", "patient_id", "split", "cohort"]
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}


def test_assign_patient_splits_is_seeded():
    df = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(60)]})
    a = assign_patient_splits(df, 0.2, 0.2, seed=1)
    assert a.equals(assign_patient_splits(df, 0.2, 0.2, seed=1))
    assert not a.equals(assign_patient_splits(df, 0.2, 0.2, seed=2))


# --- bad input: each names the file/row and says what to do ---------------------------------


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        _dm(tmp_path / "nope.csv").setup("fit")


def test_missing_required_column(tmp_path, manifest_df):
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['image'\]"):
        _dm(_write(manifest_df.drop(columns=["image"]), tmp_path)).setup("fit")


def test_duplicate_scan_id(cohort_copy, manifest_df):
    manifest_df.loc[3, "scan_id"] = manifest_df.loc[0, "scan_id"]
    path = _write(manifest_df, cohort_copy)
    with pytest.raises(ManifestError, match=r"appears more than once \(rows \[0, 3\]\)"):
        _dm(path).setup("fit")
    with pytest.raises(ManifestError, match="more than once"):  # skip mode cannot guess which one
        _dm(path, on_bad_sample="skip").setup("fit")


def test_label_outside_0_1(cohort_copy, manifest_df):
    manifest_df.loc[5, "label"] = 2.0
    with pytest.raises(
        ManifestError, match=rf"row 5 \(scan_id='{manifest_df.loc[5, 'scan_id']}'\).*outside"
    ):
        _dm(_write(manifest_df, cohort_copy)).setup("fit")


def test_non_numeric_ehr_value(cohort_copy, manifest_df):
    manifest_df["ehr_bmi"] = manifest_df["ehr_bmi"].astype(object)
    manifest_df.loc[2, "ehr_bmi"] = "obese"
    with pytest.raises(ManifestError, match=r"row 2 .*'ehr_bmi' holds 'obese'"):
        _dm(_write(manifest_df, cohort_copy)).setup("fit")


def test_patient_in_two_splits(cohort_copy, manifest_df):
    extra = manifest_df.iloc[[0]].assign(
        scan_id="extra-scan", split="test" if manifest_df.loc[0, "split"] != "test" else "train"
    )
    with pytest.raises(
        ManifestError, match=rf"patient '{manifest_df.loc[0, 'patient_id']}' is in splits"
    ):
        _dm(_write(pd.concat([manifest_df, extra]), cohort_copy)).setup()


def _break_train_image(cohort, df, how: str) -> str:
    i = int(np.flatnonzero((df["split"] == "train").to_numpy())[0])
    path = cohort / df.loc[i, "image"]
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    elif how == "4d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), path)
    elif how == "nan":
        vol = np.zeros((8, 8, 8), np.float32)
        vol[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return df.loc[i, "scan_id"]


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "does not exist"),
        ("truncated", "could not be read as NIfTI"),
        ("garbage", "could not be read as NIfTI"),
        ("4d", r"shape \(8, 8, 8, 2\); a 3-D CT volume is required"),
        ("nan", "1 NaN/inf voxels"),
    ],
)
@pytest.mark.parametrize("cache", [True, False])
def test_bad_image_raises_naming_file_and_row(cohort_copy, manifest_df, how, message, cache):
    scan_id = _break_train_image(cohort_copy, manifest_df, how)
    dm = _dm(cohort_copy / "manifest.parquet", cache_volumes=cache, batch_size=64, drop_last=False)
    with pytest.raises(BadSampleError, match=message) as err:
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
    assert scan_id in str(err.value) and ".nii.gz" in str(err.value)


@pytest.mark.parametrize("cache", [True, False])
def test_skip_mode_drops_counts_and_trains_on(cohort_copy, manifest_df, cache):
    scan_id = _break_train_image(cohort_copy, manifest_df, "truncated")
    bad_row = int(np.flatnonzero((manifest_df["split"] == "val").to_numpy())[0])
    manifest_df.loc[bad_row, "label"] = 7.0
    path = _write(manifest_df, cohort_copy, "m.parquet")
    dm = _dm(path, on_bad_sample="skip", cache_volumes=cache, batch_size=64, drop_last=False)
    dm.setup("fit")
    n_train = int((manifest_df["split"] == "train").sum())
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["scan_id"]) == n_train - 1 and scan_id not in batch["scan_id"]
    assert manifest_df.loc[bad_row, "scan_id"] not in set(dm.split_table["scan_id"])
    if cache:  # both problems found at setup, counted with reasons
        assert len(dm.problems.reasons) == 2
        assert "2 skipped" in dm.problems.summary()
    else:  # the file problem is found when loading, counted by the dataset
        assert len(dm.dataset("train").skipped) == 1


def test_validate_manifest_skip_keeps_good_rows():
    df = pd.DataFrame(
        {"patient_id": ["a", "b", "c"], "scan_id": ["1", "2", "3"], "image": ["x", "y", "z"],
         "label": [0, 5, 1], "ehr_x": ["1.5", "", "oops"]}
    )  # fmt: skip
    out = validate_manifest(df, "m.csv", ["ehr_x"], on_bad_sample="skip")
    assert list(out["scan_id"]) == ["1"]


# --- the synthetic cohort -------------------------------------------------------------------


def test_generator_is_deterministic_and_follows_contract(tmp_path):
    spec = CohortSpec(n_patients=6, n_external=2, n_ehr_features=10, volume_shape=(12, 12, 10))
    a = generate_cohort(tmp_path / "a", spec, progress=False)
    b = generate_cohort(tmp_path / "b", spec, progress=False)
    ma, mb = pd.read_parquet(a), pd.read_parquet(b)
    pd.testing.assert_frame_equal(ma, mb)
    va = nib.load(a.parent / ma["image"][0])
    np.testing.assert_array_equal(va.get_fdata(), nib.load(b.parent / mb["image"][0]).get_fdata())
    assert va.shape == (12, 12, 10) and va.header.get_zooms() == (1.0, 1.0, 1.25)
    assert set(ma["cohort"]) == {"internal", "external"}
    assert (ma.loc[ma["cohort"] == "external", "split"] == "test").all()
    validate_manifest(ma, "generated", [c for c in ma.columns if c.startswith("ehr_")])
    ext = nib.load(a.parent / ma.loc[ma["cohort"] == "external", "image"].iloc[0])
    assert ext.header.get_zooms() == pytest.approx((0.8, 0.8, 2.0))


def test_generator_never_writes_over_existing_data(tmp_path):
    spec = CohortSpec(n_patients=4, n_external=1, n_ehr_features=10, volume_shape=(8, 8, 8))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        ensure_cohort(tmp_path / "mine", spec)
    ensure_cohort(tmp_path / "c", spec)
    other = CohortSpec(n_patients=5, n_external=1, n_ehr_features=10, volume_shape=(8, 8, 8))
    with pytest.raises(FileExistsError, match="other settings.*n_patients"):
        ensure_cohort(tmp_path / "c", other)
    assert json.loads((tmp_path / "c" / "cohort.json").read_text())["spec"]["n_patients"] == 4


def test_labelled_fraction_and_label_link(tiny_cohort):
    m = pd.read_parquet(tiny_cohort / "manifest.parquet")
    train = m[m["split"] == "train"]
    assert train["label"].notna().sum() == round(TINY["labeled_fraction"] * len(train))
    assert m.loc[m["split"] != "train", "label"].notna().all()


def test_synthetic_datamodule_generates_on_first_use(tmp_path):
    dm = SyntheticCohortDataModule(root=str(tmp_path / "new"), n_patients=8, n_external=2,
                                   n_ehr_features=10, image_size=16, batch_size=2)  # fmt: skip
    assert dm.n_ehr_features == 10  # known before any file exists (the CLI links it)
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "new" / "manifest.parquet").exists()
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 16, 16, 16)
