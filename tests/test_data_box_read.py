"""Issue 24, item 4: a crop reads only the voxels it needs, and the cache fills in parallel.

The box read (``read="box"``, the default with a ``crop_size``) must give the generic
chain's crop (read all, orient, resample, crop) while decoding a fraction of the file; the
RAM cache must fill over worker processes, and under DDP with a disk cache each rank must
decode only its share. No wall-clock bound here: ``make bench-data`` measures the time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_modules import stored_volume
from data_modules.cache import AtomicPersistentDataset
from data_modules.cache_fill import preload_volumes
from data_modules.compact_volume import compact
from data_modules.dataset import cache_key, volume_items
from data_modules.manifest import RowProblems
from data_modules.readers import BadSampleError
from data_modules.transforms import (
    CTPreprocess,
    ct_pipeline,
    load_volume,
    pipeline_key,
    volume_item,
)
from tests.hospital_export import chest_scan, write_dicom_scan, write_nifti_scan

WINDOW = (-1000.0, 400.0)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("box")
    scan = chest_scan(shape=(80, 72, 36), spacing=(0.8, 0.9, 1.25))
    rois = {
        "nifti": write_nifti_scan(root / "ct.nii.gz", scan, trailing_dim=True),
        "plain": write_nifti_scan(root / "ras.nii", scan, lps_storage=False, slope=2.0),
        "dicom": write_dicom_scan(root / "series", scan),
    }
    return root, rois


PATHS = {"nifti": "ct.nii.gz", "plain": "ras.nii", "dicom": "series"}
CASES = {
    "roi 1mm": (CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(20, 20, 20)), "roi"),
    "roi anisotropic": (CTPreprocess(spacing=(1.3, 0.7, 1.1), crop_size=(24, 30, 18)), "roi"),
    "roi own spacing": (CTPreprocess(crop_size=(21, 17, 9)), "roi"),
    "roi file axes": (CTPreprocess(orientation=None, crop_size=(16, 16, 8)), "roi"),
    "roi near the edge": (CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(30, 30, 30)), "edge"),
    "larger than the scan": (CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(90, 90, 60)), "roi"),
    "foreground": (CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(20, 20, 20)), None),
    "centre": (
        CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(20, 20, 20), roi_fallback="centre"),
        None,
    ),
}


@pytest.mark.parametrize("fmt", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_box_read_gives_the_generic_chains_crop(export, fmt, case):
    root, rois = export
    pre, where = CASES[case]
    roi = {"roi": rois[fmt]["voxel"], "edge": (1.0, 2.0, 1.0), None: None}[where]
    item = volume_item(root / PATHS[fmt], roi, "voxel")
    size = [s for s in pre.crop_size]
    whole = load_volume(item, ct_pipeline(size, WINDOW, pre, read="whole"))
    box = load_volume(item, ct_pipeline(size, WINDOW, pre))
    assert box.shape == whole.shape
    assert torch.allclose(box, whole, atol=1e-5), float((box - whole).abs().max())


def test_box_read_decodes_only_the_slices_it_needs(export, monkeypatch):
    root, rois = export
    import pydicom

    decoded: list[str] = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        if not kwargs.get("stop_before_pixels"):
            decoded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(12, 12, 12))
    out = load_volume(volume_item(root / "series", rois["dicom"]["voxel"], "voxel"),
                      ct_pipeline((12,) * 3, WINDOW, pre))  # fmt: skip
    assert out.shape == (1, 12, 12, 12)
    assert 0 < len(decoded) <= 14 < 36  # 12 mm at 1.25 mm slices + margin, of 36 slices

    boxes: list[tuple] = []
    real_box = stored_volume.NiftiVolume.read_box

    def spy(self, lo, hi):
        boxes.append(tuple(int(v) for v in np.prod(np.asarray(hi) - np.asarray(lo), keepdims=True)))
        return real_box(self, lo, hi)

    monkeypatch.setattr(stored_volume.NiftiVolume, "read_box", spy)
    load_volume(volume_item(root / "ct.nii.gz", rois["nifti"]["voxel"], "voxel"),
                ct_pipeline((12,) * 3, WINDOW, pre))  # fmt: skip
    assert boxes and boxes[0][0] < 0.1 * 80 * 72 * 36


def test_box_read_names_the_file_on_bad_input(export, tmp_path):
    root, rois = export
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(8, 8, 8))
    chain = ct_pipeline((8,) * 3, WINDOW, pre)
    with pytest.raises(BadSampleError, match=r"missing\.nii\.gz does not exist"):
        load_volume(volume_item(tmp_path / "missing.nii.gz", (0.0, 0.0, 0.0)), chain)
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes((root / "ct.nii.gz").read_bytes()[:3000])
    with pytest.raises(BadSampleError, match=r"cut\.nii\.gz could not be read as NIfTI"):
        load_volume(volume_item(truncated, rois["nifti"]["voxel"], "voxel"), chain)


def _rows(root: Path, rois: dict, bad: bool = False) -> pd.DataFrame:
    rows = []
    for i, fmt in enumerate(["nifti", "plain", "dicom", "nifti"]):
        roi = rois[fmt]["voxel"]
        rows.append({"scan_id": f"s{i}", "image_path": str(root / PATHS[fmt]),
                     "roi_x": roi[0] + i, "roi_y": roi[1], "roi_z": roi[2], "roi_space": "voxel"})  # fmt: skip
    if bad:
        rows.append({"scan_id": "bad", "image_path": str(root / "nope.nii.gz"), "roi_x": 0.0,
                     "roi_y": 0.0, "roi_z": 0.0, "roi_space": "ras_mm"})  # fmt: skip
    return pd.DataFrame(rows)


def test_cache_fills_over_worker_processes(export):
    root, rois = export
    rows = _rows(root, rois, bad=True)
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(10, 10, 10))
    chain = ct_pipeline((10,) * 3, WINDOW, pre)
    serial, parallel = {}, {}
    kept = {}
    for cache, workers in ((serial, 0), (parallel, 2)):
        problems = RowProblems()
        kept[workers] = preload_volumes(
            rows, cache, chain, None, "skip", problems, "train", workers
        )
        assert len(problems.reasons) == 1 and "nope.nii.gz does not exist" in problems.reasons[0]
    assert list(kept[2]["scan_id"]) == ["s0", "s1", "s2", "s3"]
    assert serial.keys() == parallel.keys() and len(serial) == 4
    for key in serial:
        assert torch.equal(serial[key], parallel[key])
    with pytest.raises(BadSampleError, match=r"nope\.nii\.gz.*scan_id='bad'.*on_bad_sample: skip"):
        preload_volumes(rows, {}, chain, None, "raise", RowProblems(), "train", 2)


def test_ddp_ranks_each_decode_their_share_into_the_disk_cache(export, tmp_path, monkeypatch):
    """Rank r of 2 decodes items r::2 into the disk cache before the barrier; afterwards
    every rank reads every entry (the other rank's from disk, here: written by rank 1)."""
    root, rois = export
    rows = _rows(root, rois)
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(10, 10, 10))
    chain = ct_pipeline((10,) * 3, WINDOW, pre)
    key = pipeline_key((10,) * 3, WINDOW, pre)
    items = volume_items(rows)

    def disk() -> AtomicPersistentDataset:
        return AtomicPersistentDataset(items, chain, tmp_path / "cache", key)

    seen: list[int] = []

    def at_barrier() -> None:
        seen.append(len(list((tmp_path / "cache").glob("*.pt"))))
        # what rank 1 did meanwhile: its share into the same disk cache
        for i in range(1, len(items), 2):
            disk()[i]

    monkeypatch.setattr("data_modules.cache_fill.barrier", at_barrier)
    cache: dict = {}
    preload_volumes(rows, cache, chain, disk(), "raise", RowProblems(), "train", 0, 0, 2)
    assert seen == [2]  # rank 0 decoded its 2 of 4 before the barrier
    assert len(cache) == 4
    for item in items:
        assert torch.equal(cache[cache_key(item)], compact(load_volume(item, chain)))  # int16 codes


def test_real_size_benchmark_measures_every_step(export):
    """The benchmark's steps and table on a small export (``make bench-data`` runs it at
    512 x 512 x 300; no timing is asserted)."""
    from experiments.benchmarks.real_size import measure, table

    root, rois = export
    info = {"nifti": str(root / "ct.nii.gz"), "dicom": str(root / "series"), "roi": rois["nifti"]}
    rows = [measure(step, fmt, info) for fmt in ("nifti", "dicom")
            for step in ("decode", "before", "after")]  # fmt: skip
    assert [r["shape"] for r in rows if r["step"] != "decode"] == [[1, 64, 64, 64]] * 4
    assert all(r["seconds"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert "| dicom 512x512x300 |" in table(rows)
