"""The on-disk cache: hits skip decoding, config and file changes never read stale entries,
writes are atomic, concurrent writers leave a complete entry, bad entries are recomputed."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from data_modules import transforms
from data_modules.cache import AtomicPersistentDataset
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTPreprocess, ct_pipeline, pipeline_key, volume_item
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti

WINDOW = (-1000.0, 400.0)


def _cache(paths, cache_dir, size=(8, 8, 8), pre=None):
    pre = pre or CTPreprocess()
    return AtomicPersistentDataset(
        [volume_item(p) for p in paths],
        ct_pipeline(size, WINDOW, pre),
        cache_dir,
        pipeline_key(size, WINDOW, pre),
    )


@pytest.fixture
def volumes(tmp_path):
    return [
        write_nifti(tmp_path / f"v{i}.nii.gz", blob_volume(centre_vox=(4 + i, 6, 5)), np.eye(4))
        for i in range(3)
    ]


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    original = transforms.LoadCTd.load
    original_crop = transforms.ReadROICropd.crop  # a crop reads its box only (issue 24)

    def counting(self, path, *args):
        calls.append(str(path))
        return original(self, path, *args)

    def counting_crop(self, path, data):
        calls.append(str(path))
        return original_crop(self, path, data)

    monkeypatch.setattr(transforms.LoadCTd, "load", counting)
    monkeypatch.setattr(transforms.ReadROICropd, "crop", counting_crop)
    return calls


def test_second_read_comes_from_the_cache(volumes, tmp_path, count_decodes):
    ds = _cache(volumes, tmp_path / "cache")
    first = [ds[i]["image"] for i in range(3)]
    assert len(count_decodes) == 3 and len(list((tmp_path / "cache").glob("*.pt"))) == 3
    again = _cache(volumes, tmp_path / "cache")  # a new process/run: same key, same entries
    second = [again[i]["image"] for i in range(3)]
    assert len(count_decodes) == 3
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b) and type(b) is torch.Tensor


def test_changed_config_never_reads_a_stale_entry(volumes, tmp_path, count_decodes):
    _cache(volumes, tmp_path / "cache")[0]
    other = _cache(volumes, tmp_path / "cache", size=(6, 6, 6))[0]["image"]
    assert other.shape == (1, 6, 6, 6) and len(count_decodes) == 2
    cropped = _cache(volumes, tmp_path / "cache", pre=CTPreprocess(crop_size=(4, 4, 4)))[0]
    assert len(count_decodes) == 3 and cropped["image"].shape == (1, 8, 8, 8)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_replaced_file_is_decoded_again(volumes, tmp_path, count_decodes):
    before = _cache(volumes, tmp_path / "cache")[0]["image"]
    write_nifti(volumes[0], blob_volume(centre_vox=(1, 1, 1)), np.eye(4))
    st = os.stat(volumes[0])
    os.utime(volumes[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime
    after = _cache(volumes, tmp_path / "cache")[0]["image"]
    assert len(count_decodes) == 2 and not torch.equal(before, after)


def test_an_interrupted_write_leaves_no_entry(volumes, tmp_path, monkeypatch):
    ds = _cache(volumes, tmp_path / "cache")

    def dying_save(obj, fh, *a, **k):
        fh.write(b"half an entry")
        raise KeyboardInterrupt  # the job is killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ds[0]
    monkeypatch.undo()
    assert not ds.entry_path(ds.data[0]).exists()  # readers never see a partial file
    assert torch.equal(ds[0]["image"], _cache(volumes, tmp_path / "c2")[0]["image"])


def test_corrupt_entry_is_recomputed(volumes, tmp_path, count_decodes):
    ds = _cache(volumes, tmp_path / "cache")
    good = ds[0]["image"]
    ds.entry_path(ds.data[0]).write_bytes(b"garbage")
    assert torch.equal(ds[0]["image"], good) and len(count_decodes) == 2


def _writer(args):
    paths, cache_dir = args
    ds = _cache(paths, cache_dir)
    return [ds[i]["image"].sum().item() for i in range(len(paths))]


def test_concurrent_writers_leave_complete_entries(volumes, tmp_path):
    cache_dir = tmp_path / "cache"
    with mp.get_context("fork").Pool(4) as pool:
        sums = pool.map(_writer, [(volumes, cache_dir)] * 4)
    assert all(s == sums[0] for s in sums)
    assert len(list(cache_dir.glob("*.pt"))) == 3 and not list(cache_dir.glob(".*.tmp"))
    fresh = _cache(volumes, cache_dir)
    assert [fresh[i]["image"].sum().item() for i in range(3)] == pytest.approx(sums[0])


def test_datamodule_disk_cache_from_init_args(volumes, tmp_path, count_decodes):
    rows = [
        {"image": str(p), "split": s}
        for p, s in zip(volumes, ["train", "train", "val"], strict=True)
    ]
    manifest = write_manifest(tmp_path, rows)
    kw = dict(image_size=8, batch_size=2, cache_volumes=False, cache_dir=str(tmp_path / "c"))
    dm = CTEHRDataModule(str(manifest), **kw)
    dm.setup("fit")
    epoch1 = [b["image"] for b in dm.train_dataloader()]
    epoch2 = [b["image"] for b in dm.train_dataloader()]
    assert len(count_decodes) == 2  # the second epoch skipped decoding
    assert sorted(x.sum().item() for x in epoch1) == pytest.approx(
        sorted(x.sum().item() for x in epoch2)
    )


def test_shared_volume_cache_is_shared_only_between_identical_preprocessing(tiny_cohort):
    """The study runners' shared in-RAM cache: one decode per preprocessing setting, never a
    volume preprocessed one way handed to a data module that preprocesses it another way."""
    from data_modules.cache import shared_volume_cache
    from data_modules.synthetic import SyntheticCohortDataModule
    from data_modules.transforms import CTPreprocess
    from tests.conftest import TINY

    def module(**kw):
        dm = SyntheticCohortDataModule(root=str(tiny_cohort), **TINY, **kw)
        dm.setup("validate")
        return dm

    with shared_volume_cache():
        a, b = module(), module()
        other = module(hu_window=(-1200.0, 600.0))
        spaced = module(preprocess=CTPreprocess(spacing=(2.0, 2.0, 2.0)))
        assert a._cache is b._cache and len(a._cache) == len(a.dataset("val"))
        assert other._cache is not a._cache and spaced._cache is not a._cache
        with shared_volume_cache():  # nested: still the outer block's caches
            assert module()._cache is a._cache
    assert module()._cache is not a._cache  # outside the block every module decodes its own


def test_synthetic_data_module_passes_cache_dir_and_preprocessing_through(tiny_cohort, tmp_path):
    from data_modules.synthetic import SyntheticCohortDataModule
    from tests.conftest import TINY

    dm = SyntheticCohortDataModule(
        root=str(tiny_cohort), **TINY, cache_dir=str(tmp_path / "cache"), hu_window=(-900.0, 300.0)
    )
    dm.setup("validate")
    n_val = len(dm.dataset("val"))
    assert dm.hu_window == (-900.0, 300.0)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == n_val  # decoded through the disk cache
