"""Sequence mode of CTEHRDataModule: one sample per patient, the scans in time order.

The longitudinal manifest is derived here from the tiny single-scan cohort: within each
split and cohort, consecutive scans are grouped into patients of 3, 1, 2, 4, ... scans
(each scan keeps its own image, ROI and EHR record), given scan times at irregular gaps
from a per-patient origin, and labelled on the latest scan only; the rows are shuffled so
the file is not in time order.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler

from data_modules.cache import shared_volume_cache
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.manifest import ManifestError
from data_modules.readers import BadSampleError
from data_modules.sequences import LABEL_RULE, SequenceCollator
from data_modules.streaming import ShardedStream
from data_modules.transforms import CTAugment
from tests.conftest import TINY

SIZES = (3, 1, 2, 4)
GAPS = (0.0, 120.5, 280.0, 365.0)  # days between consecutive scans
S = 4


def derive_longitudinal(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The tiny cohort's scans grouped into patients with several scans over time."""
    df = df.copy()
    df["image"] = [str(root / p) for p in df["image"]]
    out, k = [], 0
    for (_split, _cohort), group in df.groupby(["split", "cohort"], sort=True):
        rows, i, c = group.reset_index(drop=True), 0, 0
        while i < len(rows):
            n = min(SIZES[c % len(SIZES)], len(rows) - i)
            scans = rows.iloc[i : i + n].copy()
            labels = scans["label"].dropna()
            scans["label"] = np.nan
            scans.iloc[-1, scans.columns.get_loc("label")] = (
                labels.iloc[-1] if len(labels) else np.nan
            )
            scans["patient_id"] = f"L{k:03d}"
            scans["scan_time"] = 37.0 * k - 2000.0 + np.cumsum(GAPS[:n])
            out.append(scans)
            i, c, k = i + n, c + 1, k + 1
    long = pd.concat(out).sample(frac=1.0, random_state=0).reset_index(drop=True)
    return long


@pytest.fixture(scope="module")
def long_df(tiny_cohort) -> pd.DataFrame:
    return derive_longitudinal(pd.read_parquet(tiny_cohort / "manifest.parquet"), tiny_cohort)


@pytest.fixture(scope="module")
def long_manifest(long_df, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("longitudinal") / "manifest.parquet"
    long_df.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module", autouse=True)
def _decode_once():
    """Data modules of this module with the same preprocessing share decoded volumes."""
    with shared_volume_cache():
        yield


def _dm(manifest, **kw) -> CTEHRDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 16)
    kw.setdefault("sequence", True)
    kw.setdefault("max_scans", S)
    return CTEHRDataModule(manifest=str(manifest), **kw)


def _batches(loader) -> list[dict]:
    return list(loader)


def _cat(batches: list[dict], key: str):
    if isinstance(batches[0][key], torch.Tensor):
        return torch.cat([b[key] for b in batches])
    return [v for b in batches for v in b[key]]


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, index=False)
    return path


# --- the batch ------------------------------------------------------------------------------


def test_sequence_batches_follow_the_contract(long_manifest):
    dm = _dm(long_manifest)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    B, F = 4, TINY["n_ehr_features"]
    assert batch["image"].shape == (B, S, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["ehr"].shape == (B, S, F) and batch["ehr"].dtype == torch.float32
    assert batch["ehr_missing"].shape == (B, S, F) and batch["ehr_missing"].dtype == torch.bool
    assert batch["scan_mask"].shape == (B, S) and batch["scan_mask"].dtype == torch.bool
    assert batch["scan_times"].shape == (B, S) and batch["scan_times"].dtype == torch.float32
    assert batch["label"].shape == (B,)
    assert all(len(batch[k]) == B for k in ("patient_id", "scan_id", "cohort"))
    mask = batch["scan_mask"]
    assert mask[:, -1].all()  # the latest scan is always at S - 1
    # left padding: once a row has a real scan, every later slot is real
    assert torch.equal(mask, mask.int().cummax(dim=1).values.bool())
    pad = ~mask
    assert (batch["image"][pad] == 0).all() and (batch["ehr"][pad] == 0).all()
    assert batch["ehr_missing"][pad].all() and (batch["scan_times"][pad] == 0).all()
    assert (batch["scan_times"] <= 0).all() and (batch["scan_times"][:, -1] == 0).all()
    real_ehr = batch["ehr"][mask]
    assert torch.equal(batch["ehr_missing"][mask], torch.isnan(real_ehr))


def test_order_times_ehr_and_label_match_the_single_scans(long_manifest, long_df):
    """Every slot holds the right scan: the same volume and EHR as single-scan mode gives for
    it, in time order, with its time relative to the latest; the label is the latest's."""
    seq, single = _dm(long_manifest), _dm(long_manifest, sequence=False)
    seq.setup("test")
    single.setup("test")
    scans = single.dataset("test")
    by_id = {sid: i for i, sid in enumerate(scans.table["scan_id"])}
    batches = _batches(seq.test_dataloader())
    pids = _cat(batches, "patient_id")
    test_df = long_df[long_df["split"] == "test"]
    assert sorted(pids) == sorted(test_df["patient_id"].unique())
    assert any(m.sum() == 1 for m in _cat(batches, "scan_mask"))  # a one-scan patient
    assert any(m.all() for m in _cat(batches, "scan_mask"))  # a full one
    images, ehr, mask = _cat(batches, "image"), _cat(batches, "ehr"), _cat(batches, "scan_mask")
    times, labels, latest_ids = (
        _cat(batches, "scan_times"),
        _cat(batches, "label"),
        _cat(batches, "scan_id"),
    )
    for b, pid in enumerate(pids):
        rows = test_df[test_df["patient_id"] == pid].sort_values("scan_time")
        n = len(rows)
        assert mask[b].tolist() == [False] * (S - n) + [True] * n
        expected_t = rows["scan_time"].to_numpy() - rows["scan_time"].max()
        np.testing.assert_allclose(times[b, S - n :].numpy(), expected_t, rtol=0, atol=1e-4)
        assert latest_ids[b] == rows["scan_id"].iloc[-1]
        label = rows["label"].iloc[-1]
        assert (np.isnan(label) and labels[b].isnan()) or labels[b] == label
        for k, sid in enumerate(rows["scan_id"], start=S - n):
            one = scans[by_id[sid]]
            assert torch.equal(images[b, k], one["image"])
            torch.testing.assert_close(ehr[b, k], one["ehr"], equal_nan=True, rtol=0, atol=0)


def test_max_scans_keeps_the_latest(long_manifest, long_df):
    dm = _dm(long_manifest, max_scans=2)
    dm.setup("test")
    batches = _batches(dm.test_dataloader())
    assert _cat(batches, "image").shape[1] == 2
    test_df = long_df[long_df["split"] == "test"]
    times = _cat(batches, "scan_times")
    for b, pid in enumerate(_cat(batches, "patient_id")):
        t = np.sort(test_df.loc[test_df["patient_id"] == pid, "scan_time"].to_numpy())[-2:]
        np.testing.assert_allclose(times[b, -len(t) :].numpy(), t - t[-1], atol=1e-4)
    four = [pid for pid, g in test_df.groupby("patient_id") if len(g) == 4]
    assert four and set(four) <= set(_cat(batches, "patient_id"))
    # the dropped older scans are not even read (nor cached)
    assert len(dm.dataset("test").scans) == sum(
        min(2, len(g)) for _, g in test_df.groupby("patient_id")
    )


def test_ram_cache_disk_cache_and_no_cache_give_the_same_batches(long_manifest, tmp_path):
    def batches(**kw) -> list[dict]:
        dm = _dm(long_manifest, image_size=12, **kw)  # its own preprocessing: a fresh RAM cache
        dm.setup("fit")
        L.seed_everything(3, verbose=False)
        return _batches(dm.train_dataloader()) + _batches(dm.val_dataloader()), dm

    ram, dm_ram = batches()
    disk, _ = batches(cache_volumes=False, cache_dir=str(tmp_path / "cache"))
    disk2, _ = batches(cache_volumes=False, cache_dir=str(tmp_path / "cache"))  # read back
    none, _ = batches(cache_volumes=False)
    for other in (disk, disk2, none):
        assert len(other) == len(ram)
        for a, b in zip(ram, other, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], torch.Tensor):
                    assert torch.equal(a[k].nan_to_num(-9), b[k].nan_to_num(-9)), k
                else:
                    assert a[k] == b[k], k
    # each scan's volume is cached once, however many sequences hold it
    used = pd.concat([dm_ram.dataset(n).scans.table for n in ("train", "val")])
    assert len(dm_ram._cache) == len(used[["image_path"]].drop_duplicates())
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(used)


def test_one_sample_per_patient_per_epoch(long_manifest, long_df):
    dm = _dm(long_manifest, batch_size=5)
    dm.setup("fit")
    train_patients = long_df.loc[long_df["split"] == "train", "patient_id"].unique()
    assert len(dm.dataset("train")) == len(train_patients)
    for epoch in range(2):
        L.seed_everything(epoch, verbose=False)
        pids = _cat(_batches(dm.train_dataloader()), "patient_id")
        assert len(pids) == len(set(pids)) == len(train_patients) // 5 * 5  # drop_last
    val = _cat(_batches(dm.val_dataloader()), "patient_id")
    assert sorted(val) == sorted(long_df.loc[long_df["split"] == "val", "patient_id"].unique())
    assert dm.dataset("val").table["patient_id"].tolist() == val  # one table row per sample


def test_predict_all_and_state_dict_round_trip(long_manifest, long_df):
    dm = _dm(long_manifest, predict_split="all")
    dm.setup("predict")
    pids = _cat(_batches(dm.predict_dataloader()), "patient_id")
    assert sorted(pids) == sorted(long_df["patient_id"].unique())
    state = dm.state_dict()
    state["ehr_stats"] = {
        **state["ehr_stats"],
        "mean": [m + 1.0 for m in state["ehr_stats"]["mean"]],
    }
    before = dm.dataset("predict").scans.ehr.copy()
    dm.load_state_dict(state)
    after = dm.dataset("predict").scans.ehr
    std = np.asarray(state["ehr_stats"]["std"], dtype=np.float32)
    np.testing.assert_allclose(after, before - 1.0 / std, rtol=1e-5, atol=1e-5)


# --- labels: require_labels, label_fraction ------------------------------------------------


def test_require_labels_keeps_whole_sequences_of_labelled_patients(long_manifest, long_df):
    dm = _dm(long_manifest, require_labels=True)
    dm.setup("fit")
    train = long_df[long_df["split"] == "train"]
    labelled = set(train.loc[train["label"].notna(), "patient_id"])
    ds = dm.dataset("train")
    assert set(ds.table["patient_id"]) == labelled and ds.table["label"].notna().all()
    n_scans = train[train["patient_id"].isin(labelled)].groupby("patient_id").size().clip(upper=S)
    assert len(ds.scans) == n_scans.sum() > len(labelled)  # earlier (unlabelled) scans stay


def test_label_fraction_selects_patients(long_manifest, long_df):
    full = _dm(long_manifest, require_labels=True)
    half = _dm(long_manifest, require_labels=True, label_fraction=0.5)
    full.setup("fit")
    half.setup("fit")
    kept = set(half.dataset("train").table["patient_id"])
    assert kept < set(full.dataset("train").table["patient_id"])
    assert set(half.dataset("train").table["label"]) == {0.0, 1.0}
    # the kept patients' sequences are whole, and validation does not move
    train = long_df[long_df["split"] == "train"]
    sizes = train[train["patient_id"].isin(kept)].groupby("patient_id").size().clip(upper=S)
    assert len(half.dataset("train").scans) == sizes.sum()
    assert len(half.dataset("val")) == len(full.dataset("val"))


# --- augmentation, streaming, collate hooks ------------------------------------------------


def test_augmentation_runs_per_scan_and_keeps_padding_zero(long_manifest):
    dm = _dm(long_manifest, augment=CTAugment(flip_prob=1.0, intensity_shift=0.1))
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    batch = next(iter(dm.train_dataloader()))
    plain = _dm(long_manifest)
    plain.setup("fit")
    ds, pds = dm.dataset("train"), plain.dataset("train")
    assert (batch["image"][~batch["scan_mask"]] == 0).all()
    p = ds.table["patient_id"].tolist().index(batch["patient_id"][0])
    assert not torch.equal(ds[p]["image"][-1], pds[p]["image"][-1])  # augmented
    assert torch.equal(ds[p]["scan_mask"], pds[p]["scan_mask"])


def test_streaming_shards_patients(long_manifest, long_df):
    dm = _dm(long_manifest, streaming=True)
    dm.setup("test")
    mapped = _dm(long_manifest)
    mapped.setup("test")
    streamed, plain = _batches(dm.test_dataloader()), _batches(mapped.test_dataloader())
    assert _cat(streamed, "patient_id") == _cat(plain, "patient_id")
    assert torch.equal(_cat(streamed, "image"), _cat(plain, "image"))
    ds = dm.dataset("test")
    shares = [
        [ds.table["patient_id"].iloc[i] for i in ShardedStream(ds, rank=r, world_size=2).indices(1)]
        for r in (0, 1)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(
        long_df.loc[long_df["split"] == "test", "patient_id"].unique()
    )


class _Hook:
    def __init__(self, supports: bool):
        if supports:
            self.supports_sequences = True

    def __call__(self, batch: dict) -> dict:
        return {**batch, "hooked": torch.ones(1)}


def test_collate_hook_applies_only_when_it_supports_sequences(long_manifest, caplog):
    dm = _dm(long_manifest)
    dm.setup("validate")
    dm.collate_hook = _Hook(supports=False)
    assert "hooked" not in next(iter(dm.val_dataloader()))
    assert "collate_hook" in caplog.text and "supports_sequences" in caplog.text
    dm.collate_hook = _Hook(supports=True)
    assert "hooked" in next(iter(dm.val_dataloader()))
    single = _dm(long_manifest, sequence=False)
    single.setup("validate")
    single.collate_hook = _Hook(supports=False)
    assert "hooked" in next(iter(single.val_dataloader()))  # single scans: as before


# --- bad files: on_bad_sample ---------------------------------------------------------------


@pytest.fixture
def broken(cohort_copy, tmp_path):
    """The longitudinal manifest over a private copy, with one earlier scan of a 3-scan
    validation patient and the latest scan of another validation patient truncated."""
    df = derive_longitudinal(pd.read_parquet(cohort_copy / "manifest.parquet"), cohort_copy)
    val = df[df["split"] == "val"]
    sizes = val.groupby("patient_id").size()
    p_early, p_late = sizes.index[sizes == 3][0], sizes.index[sizes == 2][0]
    early = val[val["patient_id"] == p_early].sort_values("scan_time").iloc[0]
    late = val[val["patient_id"] == p_late].sort_values("scan_time").iloc[-1]
    for row in (early, late):
        data = gzip.compress(b"not a nifti")
        Path(row["image"]).write_bytes(data)
    path = _write(df, tmp_path / "manifest.parquet")
    return path, df, p_early, p_late, early["scan_id"], late["scan_id"]


def test_raise_names_the_bad_scan(broken):
    path, *_ = broken
    dm = _dm(path, cache_volumes=False)
    dm.setup("validate")
    with pytest.raises(BadSampleError, match=r"scan_id=.*on_bad_sample: skip"):
        _batches(dm.val_dataloader())


@pytest.mark.parametrize("cache", [False, True])
def test_skip_drops_bad_scans_and_sequences_and_counts(broken, cache, caplog):
    path, df, p_early, p_late, early_id, late_id = broken
    # from the file: in 2 loader workers, whose skip reasons the main process reports
    workers = 0 if cache else 2
    dm = _dm(path, cache_volumes=cache, on_bad_sample="skip", batch_size=2, num_workers=workers)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = _batches(loader)
    pids = _cat(batches, "patient_id")
    val = df[df["split"] == "val"]
    assert sorted(pids) == sorted(set(val["patient_id"]) - {p_late})
    b = pids.index(p_early)
    mask = _cat(batches, "scan_mask")[b]
    assert int(mask.sum()) == 2 and mask[-1]  # one scan shorter
    times = _cat(batches, "scan_times")[b]
    t = np.sort(val.loc[val["patient_id"] == p_early, "scan_time"].to_numpy())[1:]
    np.testing.assert_allclose(times[-2:].numpy(), t - t[-1], atol=1e-4)
    reasons = loader.report.last_epoch if not cache else dm.problems.reasons
    assert len(reasons) == 3  # two unreadable scans + one sequence without its latest scan
    text = " ".join(reasons)
    assert early_id in text and late_id in text and repr(p_late) in text
    assert "bad sample(s) skipped" in caplog.text or cache


# --- bad manifests ----------------------------------------------------------------------------


def _fails(df: pd.DataFrame, tmp_path: Path, match: str, **kw) -> ManifestError:
    dm = _dm(_write(df, tmp_path / "manifest.parquet"), **kw)
    with pytest.raises(ManifestError, match=match) as err:
        dm.setup("fit")
    return err.value


def _patient(df: pd.DataFrame, n: int, split: str = "train") -> pd.DataFrame:
    sizes = df[df["split"] == split].groupby("patient_id").size()
    return df[df["patient_id"] == sizes.index[sizes == n][0]].sort_values("scan_time")


def test_two_scans_at_the_same_time_name_both(long_df, tmp_path):
    df = long_df.copy()
    rows = _patient(df, 3)
    df.loc[rows.index[1], "scan_time"] = rows["scan_time"].iloc[0]
    err = _fails(df, tmp_path, "at the same scan_time")
    assert rows["scan_id"].iloc[0] in str(err) and rows["scan_id"].iloc[1] in str(err)


@pytest.mark.parametrize("value", [np.nan, "soon", np.inf])
def test_missing_or_non_numeric_scan_time_names_the_row(long_df, tmp_path, value):
    df = long_df.copy()
    df["scan_time"] = df["scan_time"].astype(object)
    df.loc[7, "scan_time"] = value
    if isinstance(value, str):
        df["scan_time"] = df["scan_time"].astype(str)
    err = _fails(df, tmp_path, r"row 7 .*scan_time .* is missing or not a finite number")
    assert df["scan_id"].iloc[7] in str(err) and "on_bad_sample: skip" in str(err)


def test_missing_scan_time_under_skip_drops_and_counts_the_row(long_df, tmp_path):
    df = long_df.copy()
    rows = _patient(df, 3)
    df.loc[rows.index[0], "scan_time"] = np.nan
    dm = _dm(_write(df, tmp_path / "m.parquet"), on_bad_sample="skip")
    dm.setup("fit")
    assert any(rows["scan_id"].iloc[0] in r for r in dm.problems.reasons)
    ds = dm.dataset("train")
    p = ds.table["patient_id"].tolist().index(rows["patient_id"].iloc[0])
    assert int(ds[p]["scan_mask"].sum()) == 2


def test_no_scan_time_column(long_df, tmp_path):
    _fails(long_df.drop(columns="scan_time"), tmp_path, "no scan_time column.*sequence: false")
    dm = _dm(_write(long_df.drop(columns="scan_time"), tmp_path / "m.parquet"), sequence=False)
    dm.setup("validate")  # single-scan mode does not need it


def test_label_on_an_earlier_scan_is_an_error(long_df, tmp_path):
    df = long_df.copy()
    rows = _patient(df, 4)
    df.loc[rows.index[1], "label"] = 1.0
    err = _fails(df, tmp_path, LABEL_RULE)
    assert rows["scan_id"].iloc[1] in str(err) and rows["scan_id"].iloc[-1] in str(err)
    _dm(_write(df, tmp_path / "m.parquet"), sequence=False).setup("validate")  # fine per scan


def test_patient_in_two_splits_is_an_error(long_df, tmp_path):
    df = long_df.copy()
    rows = _patient(df, 3)
    df.loc[rows.index[0], "split"] = "val"
    _fails(df, tmp_path, rf"patient {rows['patient_id'].iloc[0]!r} is in splits \['train', 'val'\]")


def test_max_scans_must_be_positive(long_manifest):
    with pytest.raises(ValueError, match="max_scans"):
        _dm(long_manifest, max_scans=0)


def test_sequence_options_reach_the_cli_for_every_cohort(tmp_path, capsys):
    """``sequence`` / ``max_scans`` are CTEHRDataModule args, so the cohort subclasses (here
    the synthetic one of the quickstart config) take them through ``**kwargs``."""
    import yaml

    from jepa_lightning.main import main

    config = Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "pretrain.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--data.init_args.sequence=true",
              "--data.init_args.max_scans=3", "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert args["sequence"] is True and args["max_scans"] == 3


# --- the pieces on their own ------------------------------------------------------------------


def test_collator_counts_scans_left_out():
    sample = {"image": torch.zeros(2, 1, 2, 2, 2), "label": torch.tensor(1.0), "patient_id": "a"}
    batch = SequenceCollator()(
        [
            {**sample, "skipped_scans": ["bad scan x"]},
            {"skipped": "seq y", "skipped_scans": ["bad z"]},
        ]
    )
    assert batch["image"].shape == (1, 2, 1, 2, 2, 2)
    assert batch["skipped"] == ["bad scan x", "bad z", "seq y"]


def test_samplers_shard_patients(long_manifest, long_df):
    """In process: the samplers a 2-rank run uses (Lightning's DistributedSampler for
    training, the unrepeated one for evaluation) deal out patients, each to one rank."""
    dm = _dm(long_manifest)
    dm.setup("fit")
    for split in ("train", "val"):
        ds = dm.dataset(split)
        shares = []
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            sampler = (
                DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True)
                if split == "train"
                else dm.eval_sampler(ds, split)
            )
            shares.append([ds.table["patient_id"].iloc[i] for i in sampler])
        assert not set(shares[0]) & set(shares[1]), split
        expected = long_df.loc[long_df["split"] == split, "patient_id"].unique()
        assert sorted(shares[0] + shares[1]) == sorted(expected), split
    dm.trainer = None


# --- DDP: 2 gloo processes --------------------------------------------------------------------


class _RecordPatients(L.LightningModule):
    """Records the patients each rank trains and validates on."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.out_dir = out_dir
        self.seen: dict[str, list[str]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        assert batch["image"].shape[1] == S and batch["scan_mask"][:, -1].all()
        self.seen["train"].extend(batch["patient_id"])
        return (self.w - batch["image"].mean()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].extend(batch["patient_id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_get_disjoint_patients(long_manifest, long_df, tmp_path):
    """Lightning's own DDP (ddp_spawn, 2 gloo CPU processes): the training sampler and the
    evaluation sampler shard patients; every patient is on exactly one rank."""
    dm = _dm(long_manifest, batch_size=2, drop_last=False, cache_volumes=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_RecordPatients(str(tmp_path)), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for split in ("train", "val"):
        a, b = seen[0][split], seen[1][split]
        assert a and b and not set(a) & set(b), split
        expected = long_df.loc[long_df["split"] == split, "patient_id"].unique()
        assert sorted(a + b) == sorted(expected), split
