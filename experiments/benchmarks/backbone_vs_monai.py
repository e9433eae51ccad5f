"""(a) Forward+backward throughput: our VisionTransformer3D vs MONAI's ViT of the same size.

Same width, depth, heads, patch size and MLP ratio (4), qkv bias on, exact-erf GELU and
LayerNorm(eps 1e-5) in both, fp32, same threads, same input. MONAI is measured twice: its
default ViT (attention written out as einsum + softmax) and the same ViT with its blocks
rebuilt with ``use_flash_attention=True`` (SDPA), so the comparison is not only against a
slow attention path. Differences that remain: MONAI learns its position embedding (ours
is a fixed sin-cos buffer) and returns the hidden states of every block (no compute).

All variants are timed interleaved in one process (order rotating each round). Samples/s
are medians over rounds; the ratios (ours over MONAI's samples/s) are paired: the median
over rounds of MONAI's step time over ours *in the same round*, with a bootstrap 95 % CI
over rounds, because the host's speed drifts between rounds by more than the gaps measured.
``--compile`` adds ``torch.compile``d variants of ours and of MONAI+flash (blocks compiled
the same way; compile time reported, not timed).
``--profile`` prints where each model's time goes, by operator family.

    python -m experiments.benchmarks.backbone_vs_monai --size 128 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

from experiments.benchmarks.common import (
    interleaved,
    machine,
    median,
    paired_ratio,
    set_threads,
    spread,
)
from jepa_lightning.backbones import VisionTransformer3D
from jepa_lightning.backbones.vit3d import compile_blocks


def monai_vit(size: int, patch: int, dim: int, depth: int, heads: int, flash: bool) -> nn.Module:
    model = ViT(1, size, patch, hidden_size=dim, mlp_dim=4 * dim, num_layers=depth, num_heads=heads,
                qkv_bias=True)  # fmt: skip
    if flash:
        model.blocks = nn.ModuleList(
            TransformerBlock(dim, 4 * dim, heads, qkv_bias=True, use_flash_attention=True)
            for _ in range(depth)
        )
    return model


def compile_monai_blocks(model: nn.Module) -> None:
    for block in model.blocks:
        block.compile(dynamic=True)


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().mean().backward()

    return step


FAMILIES = (  # operator family by aten name fragment, first match wins
    ("attention", ("scaled_dot_product", "bmm", "softmax", "einsum", "aten::mul")),
    ("linear (GEMM)", ("aten::mm", "aten::addmm", "aten::linear")),
    ("patch embed (conv)", ("convolution",)),
    ("layernorm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("copies / layout", ("copy_", "cat", "clone", "contiguous", "fill_")),
    ("reductions / adds", ("sum", "add")),
)


def profile_families(step: Callable[[], None]) -> dict[str, float]:
    """Self CPU ms of one step by operator family (a rough map of where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::"):
            continue
        family = next((f for f, keys in FAMILIES if any(k in evt.key for k in keys)), "other")
        out[family] += evt.self_cpu_time_total / 1e3
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def run(size: int = 64, patch: int = 16, dim: int = 384, depth: int = 6, heads: int = 6,
        batch: int = 2, rounds: int = 5, warmup: int = 1, compile: bool = False,
        profile: bool = False) -> dict:  # fmt: skip
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "ours": VisionTransformer3D(size, patch, 1, dim, depth, heads),
        "monai": monai_vit(size, patch, dim, depth, heads, flash=False),
        "monai_flash": monai_vit(size, patch, dim, depth, heads, flash=True),
    }
    x = torch.randn(batch, 1, size, size, size)
    compile_s = {}
    if compile:
        models["ours_compiled"] = VisionTransformer3D(size, patch, 1, dim, depth, heads)
        compile_blocks(models["ours_compiled"])
        models["monai_flash_compiled"] = monai_vit(size, patch, dim, depth, heads, flash=True)
        compile_monai_blocks(models["monai_flash_compiled"])
        for name in ("ours_compiled", "monai_flash_compiled"):
            t0 = time.perf_counter()
            train_step(models[name], x)()  # the first call compiles
            compile_s[name] = round(time.perf_counter() - t0, 1)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    steps = {name: train_step(m, x) for name, m in models.items()}
    wall, cpu = interleaved(steps, rounds, warmup)
    sps = {k: batch / median(v) for k, v in wall.items()}
    sps_cpu = {k: batch / median(v) for k, v in cpu.items()}
    result = {
        "benchmark": "backbone_vs_monai",
        "volume": f"{size}^3",
        "tokens": (size // patch) ** 3,
        "config": f"dim {dim}, depth {depth}, heads {heads}, patch {patch}, mlp 4x, batch {batch}, fp32",
        "params_M": {k: round(v / 1e6, 2) for k, v in params.items()},
        "samples_per_s": {k: round(v, 3) for k, v in sps.items()},
        "samples_per_cpu_s": {k: round(v, 3) for k, v in sps_cpu.items()},
        "spread_iqr": {k: round(spread(v), 3) for k, v in wall.items()},
        "rounds": rounds,
    }
    pairs = {  # result key: (model whose speed is the numerator, the one it is compared to)
        "vs_monai": ("ours", "monai"),
        "vs_monai_flash": ("ours", "monai_flash"),
    }
    if compile:
        result["compile_s"] = compile_s
        pairs["compiled_vs_monai_flash_compiled"] = ("ours_compiled", "monai_flash_compiled")
        pairs["compiled_vs_eager"] = ("ours_compiled", "ours")
    for key, (fast, slow) in pairs.items():
        for prefix, times in (("", wall), ("cpu_", cpu)):
            ratio, ci = paired_ratio(times[slow], times[fast])  # time ratio = speed ratio
            result[f"{prefix}ratio_{key}"] = round(ratio, 2)
            result[f"{prefix}ratio_{key}_ci"] = [round(ci[0], 2), round(ci[1], 2)]
    if profile:
        result["profile_ms"] = {
            k: profile_families(steps[k]) for k in ("ours", "monai", "monai_flash")
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    result = run(args.size, batch=args.batch, rounds=args.rounds, compile=args.compile,
                 profile=args.profile)  # fmt: skip
    print(json.dumps({"machine": machine(), **result}, indent=2))


if __name__ == "__main__":
    main()
