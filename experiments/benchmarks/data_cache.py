"""Disk cache vs decoding: volumes/s over a synthetic archive of ``.nii.gz`` CT volumes.

``make bench-data`` (or ``python -m experiments.benchmarks.data_cache --n-scans 500 --size 128``)
writes an archive of int16 HU volumes (``--size``^3 voxels, 1 x 1 x 1.25 mm, gzip) once under
``data/bench_archive_<n>_<size>``, then times, in one process, three epochs through a
``DataLoader`` with ``--workers`` worker processes and the same MONAI preprocessing chain
(RAS, resample to 1.25 mm, a 96 mm box around the ROI, HU window, resize to ``--out``^3):

* MONAI's plain ``Dataset`` (decodes and preprocesses every epoch);
* our :class:`~data_modules.cache.AtomicPersistentDataset`, first epoch (decode + write);
* the same, a later epoch (reads the cached tensors).

Prints a Markdown table and writes ``bench_results/data_cache.json``. The cache folder is
emptied before the first epoch so it always measures a cold cache; the OS page cache is not
dropped (the archive may be in RAM for every variant alike).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data_modules.cache import AtomicPersistentDataset
from data_modules.transforms import CTPreprocess, ct_pipeline, pipeline_key, volume_item

SPACING = (1.0, 1.0, 1.25)
OUT = Path("bench_results")


def write_archive(root: Path, n: int, size: int) -> list[dict]:
    """``n`` volumes of lung-like texture with a nodule, their ROI centres in world mm."""
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.asarray(SPACING) * size / 2
    items = []
    for i in tqdm(range(n), desc=f"writing {n} volumes of {size}^3"):
        centre = rng.uniform(0.3, 0.7, 3) * size
        vol = -850 + 40 * rng.standard_normal((size,) * 3, dtype=np.float32)
        r = rng.uniform(3, 8)
        lo, hi = np.floor(centre - r).astype(int), np.ceil(centre + r).astype(int) + 1
        box = np.stack(
            np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
        )
        nodule = np.linalg.norm(box - centre, axis=-1) < r
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][nodule] = 40.0
        path = root / f"scan_{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(vol).astype(np.int16), affine), path)
        items.append({"path": str(path), "roi": (affine @ np.r_[centre, 1.0])[:3].tolist()})
    done.write_text(json.dumps(items))
    return items


def _collate(samples):
    return torch.stack([s["image"] for s in samples])


def epoch_rate(dataset, workers: int, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch.shape[0]
    return n / (time.perf_counter() - start)


def run(n_scans: int, size: int, out: int, workers: int, batch_size: int) -> dict:
    items = write_archive(Path("data") / f"bench_archive_{n_scans}_{size}", n_scans, size)
    data = [volume_item(it["path"], it["roi"]) for it in items]
    pre = CTPreprocess(spacing=(1.25, 1.25, 1.25), crop_size=(77, 77, 77))  # ~96 mm box
    window = (-1000.0, 400.0)
    chain = ct_pipeline((out,) * 3, window, pre)
    cache_dir = Path("data") / f"bench_cache_{n_scans}_{size}"
    shutil.rmtree(cache_dir, ignore_errors=True)

    plain = epoch_rate(Dataset(data, transform=chain), workers, batch_size)
    cached = AtomicPersistentDataset(data, chain, cache_dir, pipeline_key((out,) * 3, window, pre))
    first = epoch_rate(cached, workers, batch_size)
    later = epoch_rate(cached, workers, batch_size)
    entries = list(cache_dir.glob("*.pt"))
    return {
        "benchmark": "data_cache",
        "n_scans": n_scans,
        "volume": f"{size}^3 int16 .nii.gz",
        "output": f"{out}^3 float32",
        "workers": workers,
        "batch_size": batch_size,
        "volumes_per_s": {
            "monai_dataset": round(plain, 2),
            "cache_first_epoch": round(first, 2),
            "cache_later_epoch": round(later, 2),
        },
        "cached_vs_decode": round(later / first, 2),
        "cached_vs_monai_dataset": round(later / plain, 2),
        "cache_mb": round(sum(e.stat().st_size for e in entries) / 2**20, 1),
        "cache_entries": len(entries),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-scans", type=int, default=500)
    parser.add_argument("--size", type=int, default=128, help="edge of the stored volumes")
    parser.add_argument("--out", type=int, default=64, help="edge of the preprocessed volumes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    result = run(args.n_scans, args.size, args.out, args.workers, args.batch_size)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    OUT.mkdir(exist_ok=True)
    (OUT / "data_cache.json").write_text(json.dumps({"machine": machine, **result}, indent=2))
    r = result["volumes_per_s"]
    table = "\n".join(
        [
            f"Machine: {machine}; {result['n_scans']} scans of {result['volume']} -> "
            f"{result['output']}, {result['workers']} workers",
            "",
            "| pipeline | volumes/s | vs decode |",
            "|---|---|---|",
            f"| MONAI `Dataset` (decode every epoch) | {r['monai_dataset']} | "
            f"{r['monai_dataset'] / r['cache_first_epoch']:.2f}x |",
            f"| disk cache, first epoch (decode + write) | {r['cache_first_epoch']} | 1.00x |",
            f"| disk cache, later epoch | {r['cache_later_epoch']} | {result['cached_vs_decode']}x |",
            "",
            f"cache: {result['cache_entries']} entries, {result['cache_mb']} MB",
        ]
    )
    print(table)
    return result


if __name__ == "__main__":
    main()
