"""One real-size CT to one ROI crop: seconds and peak MB per volume, before and after.

``python -m experiments.benchmarks.real_size`` (part of ``make bench-data``) writes once, under
``data/bench_real_size``, a 512 x 512 x 300 chest CT (0.7 x 0.7 x 1 mm, int16 with
rescale) as ``.nii.gz`` and as a 300-file DICOM series (:mod:`tests.hospital_export`), then
measures, each in a fresh process (so peak RSS is that step's own):

* ``decode``: reading the whole file into an array, nothing else (nibabel ``get_fdata``
  float32; pydicom every slice's ``pixel_array``, rescaled): the floor the issue's target
  is set against (<= 1.5x of it, <= 1 GB);
* ``before``: the chain before issue 24 (``read="whole"``: read all — for DICOM MONAI's
  ``PydicomReader``, as it was — ``Orientation``, ``Spacing`` to 1 mm of the whole volume,
  96 mm crop, window, resize to 64^3);
* ``after``: the box read (``read="box"``, :class:`~data_modules.roi_crop.ReadROICropd`).

Peak MB is the process's maximum RSS minus its RSS after the imports (what the step adds).
Writes ``bench_results/real_size.json`` and prints a Markdown table. Wall-clock numbers
depend on the machine and its load: rerun on a quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("data") / "bench_real_size"
OUT = Path("bench_results")
SHAPE, SPACING = (512, 512, 300), (0.7, 0.7, 1.0)


def write_inputs(root: Path = ROOT) -> dict:
    """The NIfTI file and DICOM folder (written once) and the nodule centre per space."""
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    from tests.hospital_export import chest_scan, write_dicom_scan, write_nifti_scan

    root.mkdir(parents=True, exist_ok=True)
    scan = chest_scan(SHAPE, SPACING, nodule_radius_mm=6.0)
    rois = write_nifti_scan(root / "ct.nii.gz", scan)
    write_dicom_scan(root / "series", scan)
    info = {"nifti": str(root / "ct.nii.gz"), "dicom": str(root / "series"), "roi": rois}
    done.write_text(json.dumps(info))
    return info


class MonaiDicomLoad:
    """The reading step of the chain before issue 24 for a DICOM folder: MONAI's
    ``LoadImage(PydicomReader)`` of every file, channel first, ``Orientation`` to RAS
    (``read="whole"`` now decodes with pydicom the chosen series only)."""

    def __call__(self, data: dict) -> dict:
        import warnings

        from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

        from data_modules.readers import RAS_LABELS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = LoadImage(reader="PydicomReader", image_only=True)(data["image"])
        img = EnsureChannelFirst(channel_dim="no_channel")(img).float()
        return {**data, "image": Orientation("RAS", labels=RAS_LABELS)(img)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(step: str, fmt: str, info: dict) -> dict:
    """Run ``step`` once on the ``fmt`` input in this process: seconds and peak MB added."""
    import numpy as np

    from data_modules.transforms import CTPreprocess, ct_pipeline, load_volume, volume_item

    path = Path(info[fmt])
    pre = CTPreprocess(spacing=(1.0, 1.0, 1.0), crop_size=(96, 96, 96))
    item = volume_item(path, info["roi"]["lps_mm"], "lps_mm")
    chain = None
    if step != "decode":
        chain = ct_pipeline(
            (64, 64, 64), (-1000.0, 400.0), pre, read="whole" if step == "before" else "box"
        )
    if step == "before" and fmt == "dicom":
        chain.transforms = (MonaiDicomLoad(), *chain.transforms[1:])
    import nibabel as nib
    import pydicom

    base = _rss_mb()
    start = time.perf_counter()
    if step == "decode" and fmt == "nifti":
        vol = nib.load(str(path)).get_fdata(dtype=np.float32)
    elif step == "decode":
        files = sorted(p for p in path.iterdir() if p.is_file())
        planes = []
        for f in files:
            ds = pydicom.dcmread(f)
            planes.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        vol = np.stack(planes, -1).astype(np.float32)
    else:
        vol = load_volume(item, chain)
    seconds = time.perf_counter() - start
    return {"step": step, "format": fmt, "seconds": round(seconds, 3),
            "peak_mb": round(_rss_mb() - base, 1), "shape": list(vol.shape)}  # fmt: skip


def run(repeats: int = 1) -> list[dict]:
    write_inputs()  # once, before the measuring processes
    rows = []
    for fmt in ("nifti", "dicom"):
        for step in ("decode", "before", "after"):
            best = None
            for _ in range(repeats):  # a fresh process each: peak RSS is per step
                out = subprocess.run(
                    [sys.executable, "-m", "experiments.benchmarks.real_size", "--one", step, fmt],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                r = json.loads(out.stdout.strip().splitlines()[-1])
                best = r if best is None or r["seconds"] < best["seconds"] else best
            rows.append(best)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["format"], r["step"]): r for r in rows}
    lines = ["| format | decode alone s / MB | before s / MB | after s / MB | after / decode |",
             "|---|---|---|---|---|"]  # fmt: skip
    for fmt in ("nifti", "dicom"):
        d, b, a = (by[(fmt, s)] for s in ("decode", "before", "after"))
        lines.append(
            f"| {fmt} 512x512x300 | {d['seconds']} / {d['peak_mb']:.0f} | {b['seconds']} / "
            f"{b['peak_mb']:.0f} | {a['seconds']} / {a['peak_mb']:.0f} | "
            f"{a['seconds'] / d['seconds']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("STEP", "FORMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help="best of N fresh processes")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], write_inputs())))
        return []
    rows = run(args.repeats)
    import torch

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    OUT.mkdir(exist_ok=True)
    (OUT / "real_size.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"Machine: {machine}; one volume -> 96 mm crop at 1 mm -> 64^3\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
