"""Bootstrap statistics, label-fraction subsets and the prediction table helpers (no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from data_modules.label_subsets import (
    LabelFractionError,
    apply_label_fraction,
    label_subset_patients,
)
from jepa_lightning.callbacks import merge_rank_parts, predictions_frame
from jepa_lightning.evaluation import stats


def _frame(prob, label, patients=None) -> pd.DataFrame:
    n = len(prob)
    return pd.DataFrame(
        {
            "scan_id": [f"s{i:03d}" for i in range(n)],
            "patient_id": patients if patients is not None else [f"p{i:03d}" for i in range(n)],
            "label": np.asarray(label, dtype=float),
            "prob": np.asarray(prob, dtype=float),
        }
    )


# --- metrics --------------------------------------------------------------------------------
def test_hand_computable_auroc_and_auprc():
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4 ordered -> AUROC 0.75.
    # Ranked: 0.8 (pos, P=1), 0.4 (neg), 0.35 (pos, P=2/3): AP = (1 + 2/3) / 2 = 5/6.
    prob, label = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert stats.metric("auroc", prob, label) == pytest.approx(0.75)
    assert stats.metric("auprc", prob, label) == pytest.approx(5 / 6)
    assert stats.metric("auroc", [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert stats.metric("auroc", [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert np.isnan(stats.metric("auroc", [0.1, 0.2], [1, 1]))


def test_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, 300)
    prob = np.round(rng.random(300) * 0.6 + 0.3 * label, 2)  # rounded: many ties
    assert stats.metric("auroc", prob, label) == pytest.approx(roc_auc_score(label, prob), abs=1e-6)
    assert stats.metric("auprc", prob, label) == pytest.approx(
        average_precision_score(label, prob), abs=1e-5
    )


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="auroc"):
        stats.metric("accuracy", [0.1], [1])


# --- bootstrap ------------------------------------------------------------------------------
def test_patient_bootstrap_keeps_patients_whole_and_is_seeded():
    patients = ["a", "a", "a", "b", "c", "c"]  # scans 0-2 belong to a, 3 to b, 4-5 to c
    groups = {"a": [0, 1, 2], "b": [3], "c": [4, 5]}
    res = stats.patient_bootstrap(patients, 200, seed=1)
    assert len(res) == 200
    for idx in res:
        drawn = pd.Series(idx).map(dict(enumerate(patients)))
        for p, scans in groups.items():  # each patient contributes all scans, k times
            k = (drawn == p).sum() / len(scans)
            assert k == int(k)
            assert sorted(idx[drawn == p]) == sorted(scans * int(k))
        assert sum((drawn == p).sum() / len(s) for p, s in groups.items()) == 3  # 3 patients
    again = stats.patient_bootstrap(patients, 200, seed=1)
    assert all((a == b).all() for a, b in zip(res, again, strict=True))
    other = stats.patient_bootstrap(patients, 200, seed=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(res, other, strict=True))


def test_bootstrap_ci_perfect_model_and_informative_model():
    perfect = _frame([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1])
    s = stats.bootstrap_summary(perfect, "auroc", 300, seed=0)
    assert s["point"] == s["low"] == s["high"] == 1.0
    assert 0 < s["n_valid"] < 300  # one-class resamples are left out and counted
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 400)
    prob = rng.random(400) + 0.5 * label
    s = stats.bootstrap_summary(_frame(prob, label), "auroc", 1000, seed=0)
    assert s["low"] < s["point"] < s["high"]
    assert s["point"] == pytest.approx(roc_auc_score(label, prob), abs=1e-6)
    # Normal-theory (Hanley-McNeil-like) width for n=400 around AUROC ~0.78 is ~0.09.
    assert 0.04 < s["high"] - s["low"] < 0.15


def test_patient_level_ci_is_wider_than_scan_level_for_clustered_scans():
    """Ten identical scans per patient carry the information of one: resampling patients
    must give the width of 40 observations, not of 400."""
    rng = np.random.default_rng(1)
    label = np.repeat(rng.integers(0, 2, 40), 10)
    prob = np.repeat(rng.random(40), 10) + 0.3 * label
    patients = np.repeat([f"p{i}" for i in range(40)], 10)
    clustered = stats.bootstrap_summary(_frame(prob, label, patients), "auroc", 500, seed=0)
    as_scans = stats.bootstrap_summary(_frame(prob, label), "auroc", 500, seed=0)
    assert clustered["point"] == pytest.approx(as_scans["point"])
    assert (clustered["high"] - clustered["low"]) > 2 * (as_scans["high"] - as_scans["low"])


def test_paired_bootstrap_identical_and_better_models():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 2, 300)
    good = _frame(rng.random(300) + 0.8 * label, label)
    weak = good.assign(prob=rng.random(300) + 0.1 * label)
    same = stats.paired_bootstrap(good, good, "auroc", 500, seed=0)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    better = stats.paired_bootstrap(good, weak, "auroc", 1000, seed=0)
    assert better["delta"] > 0.2 and better["low"] > 0
    assert better["p_value"] == pytest.approx(2 / 1001)  # never 0: (0 + 1) / (n + 1), doubled
    shuffled = good.sample(frac=1.0, random_state=0)  # row order does not matter
    assert stats.paired_bootstrap(shuffled, weak, "auroc", 200, seed=0)["delta"] == pytest.approx(
        better["delta"]
    )


def test_seed_averaged_models_share_one_set_of_resamples():
    """A model given as several tables (finetuning seeds) is their mean: the point is the
    mean of the seeds' metrics, each resample scores every seed on the same patients, and a
    model's CI does not depend on which other models share the bootstrap."""
    rng = np.random.default_rng(4)
    label = np.repeat(rng.integers(0, 2, 60), 2)  # two scans per patient
    patients = np.repeat([f"p{i:02d}" for i in range(60)], 2)
    seeds = [_frame(np.round(rng.random(120) + 0.6 * label, 1), label, patients) for _ in range(3)]
    weak = [_frame(np.round(rng.random(120) + 0.1 * label, 1), label, patients) for _ in range(2)]
    b = stats.bootstrap({"good": seeds, "weak": weak}, ["auroc"], 300, seed=0)
    per_seed = [stats.metric("auroc", f["prob"], label) for f in seeds]
    s = b.summary("auroc", "good")
    assert s["mean"] == pytest.approx(np.mean(per_seed))
    assert s["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    resamples = stats.patient_bootstrap(seeds[0]["patient_id"], 300, 0)
    by_hand = stats.bootstrap_distribution(
        "auroc", np.stack([f["prob"] for f in seeds], 1), label, resamples
    ).mean(1)
    assert (s["low"], s["high"]) == pytest.approx(stats.percentile_ci(by_hand))
    # the same CI from the model's tables alone (shuffled: row order does not matter)
    alone = stats.bootstrap_summary(
        [f.sample(frac=1.0, random_state=1) for f in seeds], "auroc", 300
    )
    assert (alone["point"], alone["low"], alone["high"]) == pytest.approx(
        (s["mean"], s["low"], s["high"])
    )
    pair = stats.paired_bootstrap(seeds, weak, "auroc", 300, seed=0)
    assert pair == pytest.approx(b.paired("auroc", "good", "weak"))
    assert pair["delta"] > 0.2 and pair["low"] > 0 and pair["p_value"] < 0.01
    # a single table is its own mean, with no sd
    assert np.isnan(stats.bootstrap({"one": seeds[0]}, ["auroc"], 10).summary("auroc", "one")["sd"])


def test_one_table_may_repeat_scans_but_pairing_may_not():
    """One table per nodule may list a scan twice (two nodules): scoring it alone is fine;
    pairing needs one row per scan, so it is refused there."""
    frame = _frame([0.1, 0.9, 0.4, 0.8], [0, 1, 0, 1]).assign(scan_id=["a", "a", "b", "c"])
    assert stats.bootstrap_summary(frame, "auroc", 20)["point"] == pytest.approx(1.0)
    with pytest.raises(stats.ScanMismatchError, match="repeat scans"):
        stats.paired_bootstrap(frame, frame)


def test_paired_p_value_formula():
    assert stats.paired_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
    assert stats.paired_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 5)
    assert np.isnan(stats.paired_p_value(np.array([np.nan])))


def test_paired_bootstrap_refuses_different_scans():
    a = _frame([0.1, 0.9, 0.4], [0, 1, 0])
    b = a.copy()
    b.loc[2, "scan_id"] = "other"
    with pytest.raises(stats.ScanMismatchError, match="different scans"):
        stats.paired_bootstrap(a, b)
    c = a.assign(label=[0.0, 1.0, 1.0])
    with pytest.raises(stats.ScanMismatchError, match="label of scan 's002'"):
        stats.paired_bootstrap(a, c)


# --- label fractions ------------------------------------------------------------------------
def _train_rows(n_pos=20, n_neg=60, scans=2, unlabelled=10) -> pd.DataFrame:
    rows = []
    for i in range(n_pos + n_neg + unlabelled):
        label = 1.0 if i < n_pos else 0.0 if i < n_pos + n_neg else np.nan
        rows += [{"patient_id": f"p{i:03d}", "scan_id": f"p{i:03d}-{k}", "label": label}
                 for k in range(scans)]  # fmt: skip
    return pd.DataFrame(rows)


def test_label_subsets_are_patient_level_stratified_nested_and_seeded():
    rows = _train_rows()
    subsets = {f: label_subset_patients(rows, f, seed=0) for f in (0.01, 0.05, 0.1, 1.0)}
    assert len(subsets[1.0]) == 80
    assert subsets[0.01] <= subsets[0.05] <= subsets[0.1] <= subsets[1.0]  # nested
    pos = set(rows.loc[rows["label"] == 1, "patient_id"])
    for f, chosen in subsets.items():
        n_pos = len(chosen & pos)
        assert n_pos == max(1, round(f * 20)) and len(chosen) - n_pos == max(1, round(f * 60))
    kept = apply_label_fraction(rows, 0.1, seed=0)
    labelled = kept[kept["label"].notna()]
    assert set(labelled["patient_id"]) == subsets[0.1]
    assert labelled.groupby("patient_id").size().eq(2).all()  # all scans of a chosen patient
    assert len(kept) == len(rows)  # nothing dropped: the others become unlabelled
    assert label_subset_patients(rows, 0.1, seed=1) != subsets[0.1]
    assert label_subset_patients(rows, 0.1, seed=0) == subsets[0.1]
    assert apply_label_fraction(rows, 1.0, seed=3) is rows


def test_label_fraction_errors():
    with pytest.raises(LabelFractionError, match=r"\(0, 1\]"):
        label_subset_patients(_train_rows(), 0.0, 0)
    with pytest.raises(LabelFractionError, match="no positive one"):
        label_subset_patients(_train_rows(n_pos=0), 0.5, 0, source="m.parquet")


def test_datamodule_applies_label_fraction_to_training_patients(tiny_cohort):
    from data_modules.synthetic import SyntheticCohortDataModule
    from tests.conftest import TINY

    def train_patients(**kw) -> set[str]:
        dm = SyntheticCohortDataModule(root=str(tiny_cohort), **TINY, require_labels=True, **kw)
        dm.setup("fit")
        return set(dm.dataset("train").table["patient_id"]), dm

    full, dm = train_patients()
    half, dm_half = train_patients(label_fraction=0.5, label_subset_seed=0)
    assert half < full and len(half) >= 2
    assert len(dm_half.dataset("val")) == len(dm.dataset("val"))  # only training labels move
    with pytest.raises(LabelFractionError):
        SyntheticCohortDataModule(root=str(tiny_cohort), **TINY, label_fraction=1.5)


# --- prediction tables ----------------------------------------------------------------------
def test_prediction_rows_and_rank_merge(tmp_path):
    def batch(ids):
        n = len(ids)
        return {
            "scan_id": ids, "patient_id": [f"p-{i}" for i in ids], "cohort": ["internal"] * n,
            "label": np.zeros(n, np.float32), "prob": np.full(n, 0.5, np.float32),
            "embedding": np.ones((n, 3), np.float32),
        }  # fmt: skip

    rank0 = predictions_frame([batch(["a", "b"]), batch(["c"])])
    assert list(rank0.columns) == [
        "scan_id", "patient_id", "cohort", "label", "prob", "emb_0", "emb_1", "emb_2",
    ]  # fmt: skip
    rank1 = predictions_frame([batch(["d", "a"])])  # "a": the DistributedSampler's padding
    parts = []
    for r, f in enumerate((rank0, rank1)):
        parts.append(tmp_path / f"r{r}.parquet")
        f.to_parquet(parts[-1])
    merged = merge_rank_parts(parts)
    assert merged["scan_id"].tolist() == ["a", "b", "c", "d"]
