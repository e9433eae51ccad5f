"""Cache entries are int16 codes of the windowed volume: half the bytes, and every sample a
task sees differs from the uncached chain's by at most half a quantisation step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.cache import AtomicPersistentDataset
from data_modules.compact_volume import MAX_ERROR, STEP, compact, expand
from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import CTPreprocess, ct_pipeline, pipeline_key, volume_item
from tests.ct_fixtures import blob_volume, write_manifest, write_nifti

WINDOW = (-1000.0, 400.0)


def test_codes_round_trip_within_half_a_step_and_keep_the_ends():
    x = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0], x[0, 0, 1] = 0.0, 1.0
    codes = compact(x)
    assert codes.dtype == torch.int16 and codes.element_size() * 2 == x.element_size()
    back = expand(codes)
    assert back.dtype == torch.float32
    assert (back - x).abs().max() <= MAX_ERROR + 1e-7
    assert back[0, 0, 0] == 0.0 and back[0, 0, 1] == pytest.approx(1.0, abs=1e-7)
    assert torch.equal(compact(back), codes)  # codes are a fixed point
    assert torch.equal(expand(x), x)  # a float volume passes through
    # half a step of the default window, in HU
    assert (WINDOW[1] - WINDOW[0]) * STEP / 2 < 0.011


@pytest.fixture
def volumes(tmp_path):
    return [
        write_nifti(tmp_path / f"v{i}.nii.gz", blob_volume(centre_vox=(4 + i, 6, 5)), np.eye(4))
        for i in range(3)
    ]


def test_disk_entries_are_int16_and_read_back_within_the_step(volumes, tmp_path):
    pre = CTPreprocess()
    pipeline = ct_pipeline((8, 8, 8), WINDOW, pre)
    disk = AtomicPersistentDataset(
        [volume_item(p) for p in volumes],
        pipeline,
        tmp_path / "c",
        pipeline_key((8, 8, 8), WINDOW, pre),
    )
    first = disk[0]["image"]  # written now
    again = disk[0]["image"]  # read back, memory-mapped
    assert first.dtype == again.dtype == torch.int16 and torch.equal(first, again)
    direct = pipeline(dict(volume_item(volumes[0])))["image"]
    assert (expand(again) - direct).abs().max() <= MAX_ERROR + 1e-7


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_samples_from_either_cache_match_the_uncached_chain(volumes, tmp_path, cache):
    rows = [
        {"image": str(p), "split": s}
        for p, s in zip(volumes, ["train", "train", "val"], strict=True)
    ]
    manifest = write_manifest(tmp_path, rows)
    kw = dict(image_size=8, batch_size=3)
    uncached = CTEHRDataModule(str(manifest), cache_volumes=False, **kw)
    uncached.setup("fit")
    cached_kw = {"cache_volumes": True} if cache == "ram" else {
        "cache_volumes": False, "cache_dir": str(tmp_path / "c")}  # fmt: skip
    cached = CTEHRDataModule(str(manifest), **kw, **cached_kw)
    cached.setup("fit")
    if cache == "ram":
        assert all(v.dtype == torch.int16 for v in cached._cache.values())
    for split, i in [("train", 0), ("train", 1), ("val", 0)]:
        a = uncached.dataset(split)[i]["image"]
        for _ in range(2):  # a disk entry is written, then read
            b = cached.dataset(split)[i]["image"]
            assert b.dtype == torch.float32
            assert (a - b).abs().max() <= MAX_ERROR + 1e-7
