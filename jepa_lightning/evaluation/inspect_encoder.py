"""Look inside an encoder: PCA of patch embeddings and similarity to an anchor patch, on CT slices.

``python -m jepa_lightning.evaluation.inspect_encoder --ckpt runs/.../last.ckpt
--manifest data/synthetic/quickstart/manifest.parquet --out runs/inspect``

These are the pictures the SSL-objective literature uses to show what an encoder has learnt
to tell apart: (1) the first three principal components of every patch embedding (fitted
jointly over all shown scans, so a colour means the same thing in every scan) as RGB,
upsampled to the slice; (2) the cosine similarity of every patch embedding to one anchor
patch (default: the centre patch; choose one on a nodule with ``--anchor z,y,x``). A good
encoder paints the nodule and parenchyma in distinct, consistent colours and lights up
similar tissue from the anchor; a collapsed one is one flat colour. An encoder early in
training is dominated by its positional embedding (smooth colour ramps across the slice);
``--per-position`` subtracts each patch position's mean over the shown scans before the PCA,
leaving what differs between scans (content).

Works for any checkpoint of this framework whose backbone is the shared
:class:`~jepa_lightning.backbones.MultimodalEncoder` (MultimodalJEPA: its EMA target encoder
by default, ``--encoder online`` for the context encoder; DiagnosisTask; the baselines once
they save the same ``encoder.`` / ``target_encoder.`` keys). Writes ``pca.png`` and
``similarity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from data_modules.ct_ehr import CTEHRDataModule  # noqa: E402
from jepa_lightning.backbones import MultimodalEncoder  # noqa: E402
from jepa_lightning.pretrained import encoder_from_checkpoint  # noqa: E402


def load_encoder(
    path: str | Path, which: str = "target"
) -> tuple[MultimodalEncoder, dict, dict | None]:
    """The checkpoint's encoder in eval mode, its hyperparameters and its data state.

    ``which='target'`` takes the EMA target encoder where there is one (what downstream
    tasks load), ``'online'`` the trained context encoder."""
    kinds = {"target": "auto", "online": "context"}
    if which not in kinds:
        raise ValueError(f"--encoder must be 'target' or 'online', got {which!r}")
    encoder, hparams, data_state, _ = encoder_from_checkpoint(path, kinds[which], "--ckpt")
    return encoder, hparams, data_state or None


def patch_embeddings(
    encoder: MultimodalEncoder, batch: dict, with_ehr: bool = False
) -> torch.Tensor:
    """Encoded image patch tokens on the patch grid, ``[B, gd, gh, gw, C]``."""
    with torch.no_grad():
        tokens = encoder(
            batch["image"],
            batch["ehr"] if with_ehr else None,
            batch["ehr_missing"] if with_ehr else None,
        )
    img = tokens[:, : encoder.num_patches]
    return img.reshape(len(img), *encoder.grid, img.shape[-1])


def pca_rgb(emb: torch.Tensor, per_position: bool = False) -> torch.Tensor:
    """First three principal components of all patches of all scans, each scaled to [0, 1]
    by its 1st..99th percentile: ``[B, 3, gd, gh, gw]``. ``per_position`` first removes each
    grid position's mean over the scans (needs >= 2 scans)."""
    if per_position:
        if len(emb) < 2:
            raise ValueError("--per-position needs at least two scans (--n-scans >= 2)")
        emb = emb - emb.mean(0, keepdim=True)
    b, *grid, c = emb.shape
    x = emb.reshape(-1, c).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:3].T  # [B*N, 3]
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return comps.float().reshape(b, *grid, 3).permute(0, 4, 1, 2, 3)


def anchor_similarity(emb: torch.Tensor, anchor: tuple[int, int, int]) -> torch.Tensor:
    """Cosine similarity of every patch to the anchor patch of the same scan, ``[B, gd, gh, gw]``."""
    a = emb[:, anchor[0], anchor[1], anchor[2]]  # [B, C]
    return F.cosine_similarity(emb, a[:, None, None, None, :], dim=-1)


def upsample(maps: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``[B, K, gd, gh, gw]`` patch maps -> ``[B, K, D, H, W]`` voxels (trilinear)."""
    return F.interpolate(maps, size=size, mode="trilinear", align_corners=False)


def _slices(depth: int, anchor_z: int, n: int) -> list[int]:
    others = [int(round(v)) for v in np.linspace(depth * 0.2, depth * 0.8, n)]
    return sorted({anchor_z, *others[: max(0, n - 1)]})


def render(
    images: torch.Tensor,
    scan_ids: list[str],
    emb: torch.Tensor,
    anchor: tuple[int, int, int],
    patch: tuple[int, int, int],
    out: Path,
    n_slices: int = 2,
    title: str = "",
    per_position: bool = False,
) -> list[Path]:
    """Write ``pca.png`` and ``similarity.png``: one row per scan, per slice the CT and the map."""
    size = tuple(images.shape[-3:])
    rgb = upsample(pca_rgb(emb, per_position), size)  # [B, 3, D, H, W]
    sim = upsample(anchor_similarity(emb, anchor)[:, None], size)[:, 0]  # [B, D, H, W]
    # One colour scale for all scans, from the lowest similarity shown (1st percentile) to 1.
    sim_lo = min(float(torch.quantile(sim.flatten()[::7], 0.01)), 0.9)
    anchor_z = anchor[0] * patch[0] + patch[0] // 2
    zs = _slices(size[0], anchor_z, n_slices)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("pca", "similarity"):
        fig, axes = plt.subplots(
            len(scan_ids), 2 * len(zs), figsize=(2.2 * 2 * len(zs), 2.3 * len(scan_ids)),
            squeeze=False,
        )  # fmt: skip
        for i, scan in enumerate(scan_ids):
            for j, z in enumerate(zs):
                ct = images[i, 0, z].numpy()
                ax_ct, ax_map = axes[i, 2 * j], axes[i, 2 * j + 1]
                ax_ct.imshow(ct, cmap="gray", vmin=0, vmax=1)
                ax_ct.set_title(f"{scan} z={z}", fontsize=7)
                if kind == "pca":
                    ax_map.imshow(rgb[i, :, z].permute(1, 2, 0).numpy())
                    ax_map.set_title("PCA 1-3 as RGB", fontsize=7)
                else:
                    ax_map.imshow(ct, cmap="gray", vmin=0, vmax=1)
                    shown = ax_map.imshow(
                        sim[i, z].numpy(), cmap="magma", vmin=sim_lo, vmax=1, alpha=0.75
                    )
                    ax_map.set_title("cosine sim. to anchor", fontsize=7)
                    if z // patch[0] == anchor[0]:
                        ax_map.add_patch(
                            Rectangle(
                                (anchor[2] * patch[2] - 0.5, anchor[1] * patch[1] - 0.5),
                                patch[2], patch[1], fill=False, ec="cyan", lw=1.2,
                            )
                        )  # fmt: skip
                for ax in (ax_ct, ax_map):
                    ax.set_xticks([])
                    ax.set_yticks([])
        if kind == "similarity":
            fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity")
        fig.suptitle(
            f"{title}: {'PCA of patch embeddings' if kind == 'pca' else 'similarity to anchor patch ' + str(anchor)}",
            fontsize=9,
        )
        path = out / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def inspect(
    ckpt: str | Path,
    manifest: str | Path,
    out: str | Path,
    split: str = "test",
    n_scans: int = 4,
    n_slices: int = 2,
    anchor: tuple[int, int, int] | None = None,
    encoder_kind: str = "target",
    with_ehr: bool = False,
    per_position: bool = False,
) -> list[Path]:
    """Render the two figures for the first ``n_scans`` scans of ``split`` of ``manifest``."""
    encoder, hp, data_state = load_encoder(ckpt, encoder_kind)
    columns = (
        data_state["ehr_stats"]["columns"] if data_state and data_state.get("ehr_stats") else None
    )
    dm = CTEHRDataModule(
        str(manifest), image_size=hp["image_size"], batch_size=n_scans, ehr_columns=columns,
        predict_split=split, cache_volumes=False,
    )  # fmt: skip
    dm.setup("predict")
    if data_state is not None:
        dm.load_state_dict(data_state)
    ds = dm.dataset("predict")
    samples = [ds[i] for i in range(min(n_scans, len(ds)))]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ValueError(f"{manifest}: no readable scan in split {split!r}")
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "ehr": torch.stack([s["ehr"] for s in samples]),
        "ehr_missing": torch.stack([s["ehr_missing"] for s in samples]),
    }
    if with_ehr and batch["ehr"].shape[1] != encoder.n_ehr_features:
        raise ValueError(
            f"{manifest} has {batch['ehr'].shape[1]} EHR features, the encoder "
            f"{encoder.n_ehr_features}: use the manifest it was trained on, or drop --with-ehr"
        )
    grid = encoder.grid
    anchor = anchor or tuple(g // 2 for g in grid)
    if len(anchor) != 3 or any(not 0 <= a < g for a, g in zip(anchor, grid, strict=True)):
        raise ValueError(f"--anchor {anchor} is outside the patch grid {grid} (z,y,x indices)")
    emb = patch_embeddings(encoder, batch, with_ehr)
    patch = tuple(s // g for s, g in zip(batch["image"].shape[-3:], grid, strict=True))
    return render(
        batch["image"], [s["scan_id"] for s in samples], emb, anchor, patch, Path(out),
        n_slices, f"{Path(ckpt).name} ({encoder_kind} encoder)", per_position,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by this framework")
    parser.add_argument("--manifest", required=True, help="manifest of the CT scans to show")
    parser.add_argument("--out", required=True, help="folder for pca.png and similarity.png")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--n-scans", type=int, default=4)
    parser.add_argument("--n-slices", type=int, default=2, help="axial slices per scan")
    parser.add_argument("--anchor", default=None, help="anchor patch z,y,x (default: centre)")
    parser.add_argument("--encoder", default="target", choices=["target", "online"])
    parser.add_argument("--with-ehr", action="store_true", help="let image tokens attend to EHR")
    parser.add_argument(
        "--per-position", action="store_true", help="PCA after removing each position's mean"
    )
    args = parser.parse_args(argv)
    anchor = None
    if args.anchor:
        try:
            anchor = tuple(int(v) for v in args.anchor.split(","))
        except ValueError:
            parser.error(f"--anchor must be three integers z,y,x, got {args.anchor!r}")
    paths = inspect(
        args.ckpt, args.manifest, args.out, args.split, args.n_scans, args.n_slices, anchor,
        args.encoder, args.with_ehr, args.per_position,
    )  # fmt: skip
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
