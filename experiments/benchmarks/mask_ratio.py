"""(c) JEPA step time vs the fraction of image tokens the context encoder sees.

The context encoder only receives the kept tokens (``VisionTransformer3D.forward(x, keep)``
gathers them before the first block), so its cost should fall about linearly with the
context size (a little faster: attention is quadratic in it). The rest of the step does not
shrink: the EMA target encoder always encodes every token (forward only), the predictor
sees context + targets, and the optimizer and EMA touch every weight. This benchmark holds
the targets fixed (15 % of the tokens, random positions; EHR split fixed) and varies the
context; it times the whole training step (plain loop, same computation as Lightning's)
and the context encoder's forward+backward alone, all fractions interleaved.

    python -m experiments.benchmarks.mask_ratio --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch

from experiments.benchmarks.common import interleaved, machine, median, set_threads
from experiments.benchmarks.jepa_step import PlainJEPALoop, build_task, fresh
from jepa_lightning.masking import ehr_token_masks

FRACTIONS = (0.1, 0.25, 0.5, 0.75)
TARGET_FRACTION = 0.15


def fixed_batch(task, batch_size: int, context_fraction: float, seed: int = 0) -> dict:
    """One joint-mode batch with ``context_fraction`` of the image tokens as context and a
    fixed, disjoint 15 % as targets (the same targets for every fraction)."""
    g = torch.Generator().manual_seed(seed)
    n = task.encoder.num_patches
    n_tgt, n_ctx = round(TARGET_FRACTION * n), round(context_fraction * n)
    if n_tgt + n_ctx > n:
        raise ValueError(f"context {context_fraction} + targets {TARGET_FRACTION} exceed 1")
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(batch_size)])
    f = task.hparams.n_ehr_features
    tgt_ehr, ctx_ehr = ehr_token_masks(batch_size, f, g, (0.4, 0.4))
    return {
        "image": torch.randn(batch_size, 1, *task.encoder.vit.img_size, generator=g),
        "ehr": torch.randn(batch_size, f, generator=g),
        "ehr_missing": torch.zeros(batch_size, f, dtype=torch.bool),
        "label": torch.full((batch_size,), float("nan")),
        "tgt_image_idx": perms[:, :n_tgt].sort(1).values,
        "ctx_image_idx": perms[:, n_tgt : n_tgt + n_ctx].sort(1).values,
        "tgt_ehr_idx": tgt_ehr,
        "ctx_ehr_idx": ctx_ehr,
        "jepa_mode": "joint",
    }


def run(image_size: int = 64, patch_size: int = 8, embed_dim: int = 192, depth: int = 6,
        num_heads: int = 6, batch_size: int = 4, rounds: int = 3,
        fractions: tuple[float, ...] = FRACTIONS) -> dict:  # fmt: skip
    template = build_task(
        image_size, 32, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, predictor_dim=embed_dim // 2, predictor_depth=2,
        predictor_heads=num_heads,
    )  # fmt: skip
    variants = {}
    for fr in fractions:
        task = fresh(template).train()
        loop = PlainJEPALoop(task, total_steps=1000)
        batch = fixed_batch(task, batch_size, fr)

        def step(loop=loop, batch=batch) -> None:
            loop.step(batch)

        def context_encoder(task=task, b=batch) -> None:
            task.zero_grad(set_to_none=True)
            out = task.encoder(b["image"], b["ehr"], b["ehr_missing"], b["ctx_image_idx"],
                               b["ctx_ehr_idx"])  # fmt: skip
            out.mean().backward()

        variants[f"step@{fr}"] = step
        variants[f"context_encoder@{fr}"] = context_encoder
    wall, cpu = interleaved(variants, rounds, warmup=1)
    top = max(fractions)
    rows = []
    for fr in fractions:
        s, e = median(wall[f"step@{fr}"]), median(wall[f"context_encoder@{fr}"])
        rows.append({
            "context_fraction": fr,
            "context_tokens": round(fr * template.encoder.num_patches),
            "step_ms": round(1e3 * s, 1),
            "step_cpu_ms": round(1e3 * median(cpu[f"step@{fr}"]), 1),
            "context_encoder_ms": round(1e3 * e, 1),
            "context_encoder_cpu_ms": round(1e3 * median(cpu[f"context_encoder@{fr}"]), 1),
            "step_rel": round(s / median(wall[f"step@{top}"]), 2),
            "context_encoder_rel": round(e / median(wall[f"context_encoder@{top}"]), 2),
            "linear_rel": round(fr / top, 2),
        })  # fmt: skip
    return {
        "benchmark": "mask_ratio",
        "config": (
            f"{image_size}^3, patch {patch_size} ({template.encoder.num_patches} tokens), "
            f"dim {embed_dim}, depth {depth}, predictor {embed_dim // 2}x2, batch {batch_size}, "
            f"targets {TARGET_FRACTION:.0%} of tokens"
        ),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(json.dumps({"machine": machine(), **run(rounds=args.rounds)}, indent=2))


if __name__ == "__main__":
    main()
