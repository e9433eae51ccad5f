"""Constants and small helpers the test files share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_PRETRAIN = str(ROOT / "experiments" / "quickstart" / "pretrain.yaml")
QUICKSTART_FINETUNE = str(ROOT / "experiments" / "quickstart" / "finetune.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
