"""Issue 24, item 4 under real DDP: with ``cache_dir`` each rank decodes its share of the
volumes into the disk cache (through the box read), the ranks meet at a barrier, then every
rank holds every volume; the run must finish (no rank waits forever) and leave one entry per
scan. The share itself is unit-tested in ``test_data_box_read.py``."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.test_distributed import (  # noqa: F401  (ddp_manifest: a fixture)
    PRETRAIN,
    ddp_config,
    ddp_manifest,
    load_ranks,
    run_cli,
)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_ddp_fills_the_shared_cache_and_trains(ddp_manifest, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    data = {"cache_dir": str(tmp_path / "cache"), "cache_volumes": True, "num_workers": 1,
            "preprocess": {"spacing": [1.5, 1.5, 1.5], "crop_size": [24, 24, 24]}}  # fmt: skip
    run_cli("fit", "--config", str(ddp_config(PRETRAIN, ddp_manifest, run, data=data)))
    ranks = load_ranks(run, "fit")
    assert all(r["world_size"] == 2 for r in ranks)
    df = pd.read_parquet(ddp_manifest)
    n = int(df["split"].isin(["train", "val"]).sum())
    assert len(list((tmp_path / "cache").glob("*.pt"))) == n
