"""Forward+backward throughput: our VisionTransformer3D vs MONAI's ViT of the same size.

Both models are timed interleaved in one process (A, B, C, A, B, C, ...) so machine noise
hits them alike; the figure is the median over rounds of samples/s, and the ratio is ours
over MONAI's. MONAI is measured twice: its default ViT, and the same ViT with its blocks
rebuilt with ``use_flash_attention=True`` (SDPA), so the comparison is not only against
a slow attention path.

    python -m experiments.benchmarks.backbone_vs_monai --size 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

from jepa_lightning.backbones import VisionTransformer3D


def monai_vit(size: int, patch: int, dim: int, depth: int, heads: int, flash: bool) -> nn.Module:
    model = ViT(1, size, patch, hidden_size=dim, mlp_dim=4 * dim, num_layers=depth, num_heads=heads,
                qkv_bias=True)  # fmt: skip
    if flash:
        model.blocks = nn.ModuleList(
            TransformerBlock(dim, 4 * dim, heads, qkv_bias=True, use_flash_attention=True)
            for _ in range(depth)
        )
    return model


def step_seconds(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().mean().backward()
    return time.perf_counter() - t0


def run(size: int = 64, patch: int = 16, dim: int = 384, depth: int = 6, heads: int = 6,
        batch: int = 2, rounds: int = 5, warmup: int = 1) -> dict:  # fmt: skip
    torch.manual_seed(0)
    models = {
        "ours": VisionTransformer3D(size, patch, 1, dim, depth, heads),
        "monai": monai_vit(size, patch, dim, depth, heads, flash=False),
        "monai_flash": monai_vit(size, patch, dim, depth, heads, flash=True),
    }
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    x = torch.randn(batch, 1, size, size, size)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(warmup + rounds):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            t = step_seconds(model, x)
            if r >= warmup:
                times[name].append(t)
    sps = {k: batch / statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "backbone fwd+bwd",
        "volume": f"{size}^3",
        "tokens": (size // patch) ** 3,
        "config": f"dim {dim}, depth {depth}, heads {heads}, patch {patch}, batch {batch}",
        "params_M": {k: round(v / 1e6, 2) for k, v in params.items()},
        "samples_per_s": {k: round(v, 3) for k, v in sps.items()},
        "ratio_vs_monai": round(sps["ours"] / sps["monai"], 2),
        "ratio_vs_monai_flash": round(sps["ours"] / sps["monai_flash"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(run(args.size, rounds=args.rounds))


if __name__ == "__main__":
    main()
