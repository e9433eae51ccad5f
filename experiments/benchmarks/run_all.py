"""``make bench``: every benchmark; results as JSON + Markdown under ``bench_results/``, printed.

    python -m experiments.benchmarks.run_all            # torch's default threads
    BENCH_THREADS=1 python -m experiments.benchmarks.run_all

(a) our ViT vs MONAI's, (b) Lightning vs plain PyTorch, (c) step time vs visible tokens,
(d) loader vs model throughput, (e) peak memory vs volume size and checkpointing, (f) GPU
MFU (only with CUDA), (g) one loader worker at 96³/128³ against a ViT-B step's demand. A benchmark that fails is reported as failed and the run exits
non-zero after the others have run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from experiments.benchmarks import (
    backbone_vs_monai,
    data_path,
    gpu_feed,
    gpu_mfu,
    lightning_overhead,
    mask_ratio,
    memory,
)
from experiments.benchmarks.common import machine, machine_line, markdown_table, set_threads

OUT = Path("bench_results")


def table_backbone(results: list[dict]) -> str:
    rows = []
    for r in results:
        s = r["samples_per_s"]
        rows.append([r["volume"], r["tokens"], r["rounds"], s["ours"], s["monai"], s["monai_flash"],
                     ratio_with_ci(r, "ratio_vs_monai"), ratio_with_ci(r, "ratio_vs_monai_flash"),
                     f"{r['cpu_ratio_vs_monai']}× / {r['cpu_ratio_vs_monai_flash']}×"])  # fmt: skip
    head = ["volume", "tokens", "rounds", "ours samples/s", "MONAI", "MONAI+flash",
            "ours/MONAI [95 % CI]", "ours/MONAI+flash [95 % CI]", "same, by CPU time"]  # fmt: skip
    text = f"**(a) backbone forward+backward** ({results[0]['config']}); ratios paired by round\n\n"
    text += markdown_table(head, rows)
    prof = next((r["profile_ms"] for r in results if "profile_ms" in r), None)
    if prof:
        fams = sorted({f for p in prof.values() for f in p}, key=lambda f: -prof["ours"].get(f, 0))
        prof_rows = [
            [f] + [prof[m].get(f, 0) for m in ("ours", "monai", "monai_flash")] for f in fams
        ]
        vol = next(r["volume"] for r in results if "profile_ms" in r)
        text += f"\n\nWhere one step's time goes at {vol} (self CPU ms, one profiled step):\n\n"
        text += markdown_table(["operator family", "ours", "MONAI", "MONAI+flash"], prof_rows)
    return text


def ratio_with_ci(result: dict, key: str) -> str:
    low, high = result[f"{key}_ci"]
    return f"{result[key]}× [{low}, {high}]"


def table_overhead(r: dict) -> str:
    rows = [[k, r["step_ms"][k], r["step_cpu_ms"][k], r["steps_timed"][k]] for k in r["step_ms"]]
    return (
        f"**(b) Lightning vs plain PyTorch** ({r['config']}): overhead, paired by round, "
        f"**{r['overhead_paired_pct']} %** (95 % CI {r['overhead_paired_ci'][0]} … "
        f"{r['overhead_paired_ci'][1]} %, {r['rounds']} rounds); pooled over all steps "
        f"{r['overhead_pct']} % by wall time, {r['overhead_cpu_pct']} % by CPU time\n\n"
        + markdown_table(["loop", "median step ms", "median step CPU ms", "steps timed"], rows)
    )


def table_mask_ratio(r: dict) -> str:
    keys = ["context_fraction", "context_tokens", "step_ms", "step_rel", "context_encoder_ms",
            "context_encoder_rel", "linear_rel"]  # fmt: skip
    head = ["visible fraction", "context tokens", "step ms", "step rel.", "context encoder ms",
            "encoder rel.", "linear in context"]  # fmt: skip
    return f"**(c) JEPA step vs visible tokens** ({r['config']})\n\n" + markdown_table(
        head, [[row[k] for k in keys] for row in r["rows"]]
    )


def table_data_path(r: dict) -> str:
    keys = ["cache_volumes", "num_workers", "loader_samples_per_s", "model_samples_per_s",
            "loader_over_model", "data_stall_pct", "masks_built_in_workers"]  # fmt: skip
    head = ["volume cache", "workers", "loader samples/s", "model samples/s", "loader/model",
            "data stall %", "masks built in workers"]  # fmt: skip
    return f"**(d) data path** ({r['config']})\n\n" + markdown_table(
        head, [[row[k] for k in keys] for row in r["rows"]]
    )


def table_memory(r: dict) -> str:
    keys = ["volume", "tokens", "grad_checkpointing", "peak_mb", "step_peak_above_resident_mb"]
    head = ["volume", "tokens", "checkpointing", "peak MB", "step peak above resident MB",
            "saved by checkpointing"]  # fmt: skip
    rows = [[row[k] for k in keys] + [f"{row['step_peak_saved_pct']} %" if "step_peak_saved_pct" in row else ""]
            for row in r["rows"]]  # fmt: skip
    measure = r["rows"][0]["measure"]
    return f"**(e) peak memory** ({r['config']}; {measure})\n\n" + markdown_table(head, rows)


def table_mfu(r: dict) -> str:
    keys = ["device", "samples_per_s", "step_ms", "model_gflop_per_step", "achieved_tflops",
            "peak_bf16_tflops", "mfu_pct"]  # fmt: skip
    return (
        f"**(f) GPU MFU** ({r['config']})\n\n"
        + markdown_table(keys, [[r[k] for k in keys]])
        + f"\n\n{r['how']}; FLOPs counted by FlopCounterMode on one step: "
        f"{r['counted_gflop_first_step']} G (analytic {r['analytic_gflop_first_step']} G)."
    )


def benchmarks() -> list[tuple[str, callable, callable]]:
    items = [
        (
            "backbone_vs_monai",
            lambda: [
                backbone_vs_monai.run(size=64, rounds=15),
                backbone_vs_monai.run(size=128, rounds=8, profile=True),
            ],
            table_backbone,
        ),  # fmt: skip
        ("lightning_overhead", lambda: lightning_overhead.run(rounds=30, steps=8), table_overhead),
        ("mask_ratio", lambda: mask_ratio.run(rounds=3), table_mask_ratio),
        ("data_path", lambda: data_path.run(), table_data_path),
        ("memory", lambda: memory.run(threads=torch.get_num_threads()), table_memory),
        ("gpu_feed", lambda: gpu_feed.run(), gpu_feed.table),
    ]
    if torch.cuda.is_available():
        items.append(("gpu_mfu", lambda: gpu_mfu.run(), table_mfu))
    return items


def main() -> int:
    set_threads(int(os.environ["BENCH_THREADS"]) if os.environ.get("BENCH_THREADS") else None)
    OUT.mkdir(exist_ok=True)
    info = machine()
    results, sections, failed = {}, [], []
    t_start = time.perf_counter()
    for name, fn, table in benchmarks():
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = fn()
            sections.append(table(results[name]))
        except Exception:  # report and go on: one broken benchmark must not hide the rest
            failed.append(name)
            results[name] = {"error": traceback.format_exc()}
            sections.append(f"**{name}: FAILED** (see results.json)")
            traceback.print_exc()
        print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not torch.cuda.is_available():
        sections.append("**(f) GPU MFU**: skipped, no CUDA device on this machine.")
    info["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    total = time.perf_counter() - t_start
    (OUT / "results.json").write_text(
        json.dumps({"machine": info, "total_s": round(total, 1), "results": results}, indent=2)
    )
    text = "\n\n".join(
        [f"Machine: {machine_line(info)}; load average at the end {info['load_avg_1m_end']}; "
         f"whole run {total / 60:.1f} min."] + sections
    )  # fmt: skip
    (OUT / "results.md").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
