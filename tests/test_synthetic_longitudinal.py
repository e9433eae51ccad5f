"""The synthetic cohort over time (``scans_per_patient``, ``scan_interval_days``,
``growth_signal``), measured on the files the generator writes.

* Each patient has a uniform number of scans in range, in time order, with gaps in range;
  only the latest carries the label; the nodule stays at one centre in one anatomy while
  the scanner noise is fresh.
* The nodule's growth follows its label as often as ``growth_signal`` says: malignant ones
  grow faster at 1, growth is independent of the label at 0, and the latest scan (the
  cross-sectional signal) is the same whatever ``growth_signal`` is.
* The defaults write the one-scan cohort: the new settings change nothing else in it.
"""

from __future__ import annotations

import filecmp
import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.synthetic import (
    CohortSpec,
    SyntheticCohortDataModule,
    ensure_cohort,
    generate_cohort,
)
from data_modules.synthetic.causes import (
    BENIGN_DOUBLING_DAYS,
    MALIGNANT_DOUBLING_DAYS,
    doubling_time,
)
from data_modules.synthetic.cohort import main as generator_main

SMALL = dict(n_patients=40, n_external=10, n_ehr_features=12, volume_shape=(16, 16, 16), seed=3)
OVER_TIME = dict(scans_per_patient=(1, 4), scan_interval_days=(60.0, 400.0))


def _generate(root, **settings):
    generate_cohort(root, CohortSpec(**{**SMALL, **settings}), progress=False, workers=1)
    manifest = pd.read_parquet(root / "manifest.parquet")
    return manifest.merge(pd.read_parquet(root / "latents.parquet"), on="scan_id")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict:
    """The same patients as one scan each, and over time with growth_signal 1 and 0."""
    base = tmp_path_factory.mktemp("longitudinal")
    out = {"one": (base / "one", _generate(base / "one"))}
    for name, g in (("g1", 1.0), ("g0", 0.0)):
        out[name] = (base / name, _generate(base / name, **OVER_TIME, growth_signal=g))
    return out


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df.groupby("patient_id")["scan_time"].idxmax()].set_index("patient_id")


def _growth_rate(df: pd.DataFrame) -> pd.Series:
    """ln 2 / doubling time per day (0 for a stable nodule)."""
    return math.log(2) / df["doubling_time_days"]


def test_scans_per_patient_and_gaps_are_in_range_and_in_time_order(cohorts):
    _, df = cohorts["g1"]
    counts = df.groupby("patient_id").size()
    assert counts.between(1, 4).all() and set(counts) == {1, 2, 3, 4}, counts.value_counts()
    assert set(df["cohort"]) == {"internal", "external"}
    assert df.groupby("patient_id")["cohort"].nunique().eq(1).all()
    assert df.groupby("patient_id")["split"].nunique().eq(1).all()
    for pid, scans in df.groupby("patient_id", sort=False):
        assert list(scans["scan_id"]) == [f"{pid}-s{k}" for k in range(len(scans))]
        assert scans["scan_time"].iloc[0] == 0.0
        gaps = np.diff(scans["scan_time"].to_numpy())
        assert ((gaps >= 60.0) & (gaps <= 400.0)).all(), (pid, gaps)


def test_only_the_latest_scan_carries_the_label(cohorts):
    _, df = cohorts["g1"]
    _, one = cohorts["one"]
    latest = _latest(df)
    earlier = df[~df["scan_id"].isin(latest["scan_id"])]
    assert len(earlier) > 0 and earlier["label"].isna().all()
    # The latest scan shows exactly the label the one-scan cohort shows for that patient.
    one = one.set_index("patient_id").loc[latest.index]
    pd.testing.assert_series_equal(latest["label"], one["label"])
    assert latest.loc[latest["cohort"] == "external", "label"].notna().all()


def test_latest_scan_is_the_one_scan_cohorts_scan(cohorts):
    """The latest scan is today's cross-sectional scan: same image, EHR, ROI and nodule."""
    root, df = cohorts["g1"]
    one_root, one = cohorts["one"]
    latest = _latest(df)
    one = one.set_index("patient_id").loc[latest.index]
    same = ["roi_x", "roi_y", "roi_z", "radius_mm", "density_hu", "true_label"]
    same += [c for c in df.columns if c.startswith("ehr_")]
    pd.testing.assert_frame_equal(latest[same], one[same])
    for pid in latest.index[:8]:
        a = np.asarray(nib.load(root / latest.loc[pid, "image"]).dataobj)
        b = np.asarray(nib.load(one_root / one.loc[pid, "image"]).dataobj)
        assert np.array_equal(a, b), pid


def test_same_centre_and_anatomy_fresh_noise_across_scans(cohorts):
    root, df = cohorts["g1"]
    for col in ("roi_x", "roi_y", "roi_z", "density_hu", "lung_density_hu"):
        assert df.groupby("patient_id")[col].nunique().eq(1).all(), col
    spec = CohortSpec(**SMALL)
    patients = [p for p, s in df.groupby("patient_id") if len(s) >= 2 and p.startswith("int")]
    checked = 0
    for pid in patients[:6]:
        scans = df[df["patient_id"] == pid]
        img = nib.load(root / scans["image"].iloc[0])
        first = np.asarray(img.dataobj, dtype=np.float64)
        last = np.asarray(nib.load(root / scans["image"].iloc[-1]).dataobj, dtype=np.float64)
        # Voxels the nodule reaches in no scan: the same anatomy plus independent noise.
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in first.shape], indexing="ij"), -1)
        xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
        centre = scans[["roi_x", "roi_y", "roi_z"]].iloc[0].to_numpy()
        away = np.linalg.norm(xyz - centre, axis=-1) > scans["nodule_reach_mm"].max()
        if away.sum() < 200:
            continue
        diff_sd = (last - first)[away].std()
        expected = math.sqrt(2) * spec.image_noise_hu * spec.internal.noise_scale
        assert 0.8 * expected < diff_sd < 1.2 * expected, (pid, diff_sd, expected)
        checked += 1
    assert checked >= 3


def test_earlier_radius_follows_the_doubling_time(cohorts):
    _, df = cohorts["g1"]
    latest = _latest(df)
    r_latest = latest.loc[df["patient_id"], "radius_mm"].to_numpy()
    t_rel = df["scan_time"].to_numpy() - latest.loc[df["patient_id"], "scan_time"].to_numpy()
    expected = r_latest * 2.0 ** (t_rel / (3 * df["doubling_time_days"].to_numpy()))
    np.testing.assert_allclose(df["radius_mm"], expected, rtol=1e-12)
    assert (df["radius_mm"] <= r_latest + 1e-12).all()
    assert df.groupby("patient_id")["doubling_time_days"].nunique().eq(1).all()


def test_malignant_nodules_grow_faster_when_growth_carries_the_signal(cohorts):
    _, df = cohorts["g1"]
    latest = _latest(df)
    assert latest["growth_follows_label"].all()
    malignant, benign = latest["true_label"] == 1, latest["true_label"] == 0
    assert malignant.sum() >= 5 and benign.sum() >= 5
    dt = latest["doubling_time_days"]
    assert dt[malignant].between(*MALIGNANT_DOUBLING_DAYS).all()
    assert (np.isinf(dt[benign]) | dt[benign].between(*BENIGN_DOUBLING_DAYS)).all()
    rate = _growth_rate(latest)
    assert rate[malignant].mean() > 3 * rate[benign].mean()
    assert rate.corr(latest["true_label"].astype(float), method="spearman") > 0.6


def test_growth_says_nothing_about_the_label_at_growth_signal_0(cohorts):
    _, df = cohorts["g0"]
    latest = _latest(df)
    assert not latest["growth_follows_label"].any()
    rho = _growth_rate(latest).corr(latest["true_label"].astype(float), method="spearman")
    # Measured (seed 3, 50 patients): -0.13; the label-driven draw (growth_signal 1) 0.88.
    assert abs(rho) < 0.35, rho
    # Exactly: with growth_signal 0 a patient's doubling time is the same whatever its label.
    for i in range(300):
        draws = [doubling_time(np.random.default_rng([i, 3]), y, 0.0, 0.3) for y in (0, 1)]
        assert draws[0] == draws[1], i
    follows = [doubling_time(np.random.default_rng([i, 3]), 1, 0.3, 0.3)[1] for i in range(2000)]
    assert 0.25 < np.mean(follows) < 0.35


def test_latest_radius_does_not_depend_on_growth_signal(cohorts):
    (_, g1), (_, g0) = cohorts["g1"], cohorts["g0"]
    assert list(g1["scan_id"]) == list(g0["scan_id"])  # same schedule
    a, b = _latest(g1), _latest(g0)
    pd.testing.assert_series_equal(a["radius_mm"], b["radius_mm"])
    assert not np.allclose(g1["radius_mm"], g0["radius_mm"])  # earlier scans do differ


def test_default_settings_write_the_one_scan_cohort(tmp_path, cohorts):
    """(1, 1) scans: the other new settings change no file but cohort.json, and the files
    keep their columns; the default is the same as asking for (1, 1) explicitly."""
    one_root, one = cohorts["one"]
    other = tmp_path / "other"
    _generate(other, scans_per_patient=(1, 1), scan_interval_days=(10, 20), growth_signal=0.8)
    names = ["manifest.parquet", "latents.parquet"]
    names += [f"images/{p.name}" for p in sorted((one_root / "images").iterdir())]
    match, mismatch, errors = filecmp.cmpfiles(one_root, other, names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names) == 2 + 50
    assert not {"doubling_time_days", "growth_follows_label"} & set(one.columns)
    assert (one["scan_time"] == 0.0).all() and one["scan_id"].str.endswith("-s0").all()
    explicit = CohortSpec(**SMALL, scans_per_patient=(1, 1), scan_interval_days=[90, 540])
    assert explicit == CohortSpec(**SMALL) and explicit.to_json() == CohortSpec(**SMALL).to_json()


def test_cohort_written_before_the_time_settings_is_still_accepted(tmp_path):
    spec = CohortSpec(n_patients=4, n_external=0, volume_shape=(8, 8, 8))
    root = tmp_path / "c"
    generate_cohort(root, spec, progress=False, workers=1)
    info = json.loads((root / "cohort.json").read_text())
    for key in ("scans_per_patient", "scan_interval_days", "growth_signal"):
        del info["spec"][key]  # as written before these settings existed
    (root / "cohort.json").write_text(json.dumps(info))
    assert ensure_cohort(root, spec) == root / "manifest.parquet"
    with pytest.raises(FileExistsError, match="scans_per_patient"):
        ensure_cohort(root, CohortSpec(**{**spec.__dict__, "scans_per_patient": (1, 3)}))


def test_files_over_time_do_not_depend_on_the_number_of_workers(tmp_path):
    spec = CohortSpec(**{**SMALL, "volume_shape": (10, 10, 10)}, **OVER_TIME, growth_signal=0.5)
    one, two = tmp_path / "one", tmp_path / "two"
    generate_cohort(one, spec, progress=False, workers=1)
    generate_cohort(two, spec, progress=False, workers=2)
    images = sorted(p.name for p in (one / "images").iterdir())
    names = ["manifest.parquet", "latents.parquet"] + [f"images/{n}" for n in images]
    match, mismatch, errors = filecmp.cmpfiles(one, two, names, shallow=False)
    assert not mismatch and not errors and len(images) > 50


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scans_per_patient=(0, 2)), "scans_per_patient"),
        (dict(scans_per_patient=(3, 2)), "scans_per_patient"),
        (dict(scans_per_patient=(1, 2.5)), "scans_per_patient"),
        (dict(scan_interval_days=(0.0, 30.0)), "scan_interval_days"),
        (dict(scan_interval_days=(90.0, 30.0)), "scan_interval_days"),
        (dict(growth_signal=1.5), "growth_signal=1.5"),
    ],
)
def test_bad_time_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CohortSpec(**kwargs)


def test_time_settings_reach_the_spec_from_the_cli_and_the_data_module(tmp_path, capsys):
    root = tmp_path / "cli"
    generator_main(
        [
            f"--root={root}",
            "--n-patients=3",
            "--n-external=0",
            "--scans-per-patient",
            "2",
            "3",
            "--scan-interval-days",
            "30",
            "60",
            "--growth-signal=0.5",
            "--workers=1",
        ]
    )
    saved = json.loads((root / "cohort.json").read_text())["spec"]
    assert saved["scans_per_patient"] == [2, 3] and saved["scan_interval_days"] == [30.0, 60.0]
    assert saved["growth_signal"] == 0.5
    assert pd.read_parquet(root / "manifest.parquet").groupby("patient_id").size().ge(2).all()
    dm = SyntheticCohortDataModule(
        root=str(root),
        n_patients=3,
        n_external=0,
        scans_per_patient=[2, 3],
        scan_interval_days=[30, 60],
        growth_signal=0.5,
    )
    assert dm.spec.to_json() == saved
    dm.prepare_data()  # reuses the folder: the settings match


def test_each_scan_has_its_own_ehr_record_and_the_age_at_that_scan(cohorts):
    _, df = cohorts["g1"]
    latest = _latest(df)
    ages = latest.loc[df["patient_id"], "ehr_age"].to_numpy()
    t_rel = df["scan_time"].to_numpy() - latest.loc[df["patient_id"], "scan_time"].to_numpy()
    np.testing.assert_allclose(df["ehr_age"], ages + t_rel / 365.25)
    earlier = df[~df["scan_id"].isin(latest["scan_id"])]
    # Continuous features (not age): closer to the patient's own latest record than to
    # another patient's.
    cols = ["ehr_bmi", "ehr_fev1_pct", "ehr_hba1c"] + [c for c in df if c.startswith("ehr_sig")]
    x = latest[cols].to_numpy(np.float64)
    mu, sd = np.nanmean(x, 0), np.nanstd(x, 0)
    e = (earlier[cols].to_numpy(np.float64) - mu) / sd
    order = list(latest.index)
    mine = (latest.loc[earlier["patient_id"], cols].to_numpy(np.float64) - mu) / sd
    next_patient = [order[(order.index(p) + 1) % len(order)] for p in earlier["patient_id"]]
    others = (latest.loc[next_patient, cols].to_numpy(np.float64) - mu) / sd
    assert not np.allclose(np.nan_to_num(e), np.nan_to_num(mine))  # fresh noise
    own, other = np.nanmean((e - mine) ** 2), np.nanmean((e - others) ** 2)
    assert own < 0.7 * other, (own, other)  # the same causes


def test_time_settings_are_yaml_keys(capsys):
    from jepa_lightning.main import main

    argv = [
        "fit",
        "--config=experiments/quickstart/pretrain.yaml",
        "--data.init_args.scans_per_patient=[1, 4]",
        "--data.init_args.scan_interval_days=[30, 365]",
        "--data.init_args.growth_signal=0.5",
        "--print_config",
    ]
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert "growth_signal: 0.5" in out and "scans_per_patient:" in out, out
    assert "scan_interval_days:" in out
