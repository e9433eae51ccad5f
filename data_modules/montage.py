"""``python -m data_modules.montage --config my_data.yaml --out crops.png``: look at the input.

Why: a wrong ROI space, window or crop size is obvious to the eye and invisible in a loss
curve; checking a page of crops takes a minute, an hour of training on empty crops does
not (issue 24). This writes a PNG: one row per sample, three orthogonal slices through the
ROI centre (axial, coronal, sagittal) of the volume exactly as the model receives it (the
data module's preprocessing: ROI space, orientation, spacing, crop, HU window, resize), the
ROI centre marked. Slices are shown in the radiological convention: the patient's right on
the image's left, anterior and superior up. Without an ROI the slices pass through the
crop's centre (the fallback the data module uses), marked "no ROI".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.dataset import volume_items
from data_modules.readers import STORED_AFFINE
from data_modules.roi import roi_to_ras
from data_modules.transforms import ToPlainTensord, as_bad_sample


def preprocess_with_roi(
    item: dict[str, Any], chain: Compose
) -> tuple[np.ndarray, np.ndarray | None]:
    """The preprocessed ``[D, H, W]`` volume and the ROI centre's (z, y, x) index in it
    (None without an ROI): the chain runs up to its geometry-final step, where the affine
    places the ROI, then on."""
    steps = list(chain.transforms)
    cut = next(i for i, t in enumerate(steps) if isinstance(t, ToPlainTensord))
    try:
        data = Compose(steps[:cut])(dict(item))
        img = data["image"]
        roi = None
        if item.get("roi") is not None:
            world = roi_to_ras(item["roi"], item["roi_space"], img.meta.get(STORED_AFFINE))
            xyz = (np.linalg.inv(np.asarray(img.affine, dtype=float)) @ np.r_[world, 1.0])[:3]
            shape_xyz = np.asarray(img.shape[1:], dtype=float)
            roi = xyz[::-1] / shape_xyz[::-1]  # (z, y, x) as a fraction of the crop
        out = Compose(steps[cut:])(data)["image"]
    except Exception as err:
        raise as_bad_sample(err, item["source"]) from err
    vol = out[0].numpy()
    if roi is not None:  # fractions -> voxel centres of the resized volume
        roi = (roi * np.asarray(vol.shape)) - 0.5
    return vol, roi


def _views(
    vol: np.ndarray, centre: np.ndarray
) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    """Axial, coronal, sagittal slices through ``centre`` (z, y, x) in display orientation,
    with the centre's (row, column) in each."""
    d, h, w = vol.shape
    z, y, x = (
        int(np.clip(round(float(c)), 0, s - 1)) for c, s in zip(centre, vol.shape, strict=True)
    )
    cz, cy, cx = (float(c) for c in centre)
    return [
        ("axial", vol[z, ::-1, ::-1], (h - 1 - cy, w - 1 - cx)),
        ("coronal", vol[::-1, y, ::-1], (d - 1 - cz, w - 1 - cx)),
        ("sagittal", vol[::-1, :, x][:, ::-1], (d - 1 - cz, h - 1 - cy)),
    ]


def write_montage(
    dm: CTEHRDataModule, out: Path, n: int = 8, split: str = "train", seed: int = 0
) -> int:
    """Preprocess ``n`` scans of ``split`` (those with an ROI first, then seeded at random)
    and write the PNG; returns the number of rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = dm.load_table()
    rows = table if split == "all" else table[table["split"] == split]
    if rows.empty:
        raise ValueError(f"manifest {dm.manifest}: the {split!r} split has no scan to show")
    rng = np.random.default_rng(seed)
    has_roi = rows[["roi_x", "roi_y", "roi_z"]].notna().all(1) if "roi_x" in rows else False
    order = rng.permutation(len(rows))
    if has_roi is not False:
        order = sorted(order, key=lambda i: not bool(has_roi.iloc[i]))
    rows = rows.iloc[list(order[:n])].reset_index(drop=True)
    items, chain = volume_items(rows), dm.pipeline()
    lo, hi = dm.hu_window
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, item in enumerate(items):
        vol, roi = preprocess_with_roi(item, chain)
        centre = roi if roi is not None else (np.asarray(vol.shape) - 1) / 2.0
        label = rows["label"].iloc[r]
        name = f"{rows['scan_id'].iloc[r]} (label {'-' if np.isnan(label) else int(label)})"
        for c, (view, image, (pr, pc)) in enumerate(_views(vol, centre)):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if roi is not None:
                ax.plot([pc], [pr], marker="+", color="red", markersize=14, mew=1.5)
                ax.add_patch(
                    plt.Circle((pc, pr), max(image.shape) * 0.12, fill=False, color="red", lw=1)
                )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {view}" if c == 0 else view, fontsize=8)
        if roi is None:
            axes[r, 0].text(1, 3, "no ROI", color="yellow", fontsize=8, va="top")
    fig.suptitle(
        f"{dm.manifest}: {split} split, window {lo:g}..{hi:g} HU, input {list(dm.image_size)}",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.montage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="the data config(s) training uses (repeatable, merged as fit merges them)")  # fmt: skip
    parser.add_argument("--manifest", help="instead of --config: a manifest read with defaults")
    parser.add_argument("--roi-space", choices=["ras_mm", "lps_mm", "voxel"])
    parser.add_argument("--out", required=True, help="output .png")
    parser.add_argument("--n", type=int, default=8, help="samples (rows of the montage)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.manifest):
        parser.error("give --config (the training data config) or --manifest")
    if args.config:
        from data_modules.data_config import datamodule_from_configs

        overrides = {"roi_space": args.roi_space} if args.roi_space else {}
        dm = datamodule_from_configs(args.config, **overrides)
    else:
        dm = CTEHRDataModule(args.manifest, roi_space=args.roi_space)
    n = write_montage(dm, Path(args.out), args.n, args.split, args.seed)
    print(f"wrote {n} preprocessed sample(s) of the {args.split} split to {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
