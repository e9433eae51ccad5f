"""``make bench``: every benchmark, results as JSON + a Markdown table under bench_results/."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from experiments.benchmarks import backbone_vs_monai

OUT = Path("bench_results")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results = [backbone_vs_monai.run(size=64, rounds=5), backbone_vs_monai.run(size=128, rounds=3)]
    (OUT / "results.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2)
    )
    lines = [
        f"Machine: {machine}",
        "",
        "| benchmark | volume | tokens | ours samples/s | MONAI | MONAI+flash | ours/MONAI | ours/MONAI+flash |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["samples_per_s"]
        lines.append(
            f"| {r['benchmark']} ({r['config']}) | {r['volume']} | {r['tokens']} | {s['ours']} | {s['monai']} | "
            f"{s['monai_flash']} | {r['ratio_vs_monai']}× | {r['ratio_vs_monai_flash']}× |"
        )
    table = "\n".join(lines)
    (OUT / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
