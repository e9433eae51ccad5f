"""Shared fixtures: tiny cohorts generated on the fly (nothing is downloaded or committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")

from data_modules.synthetic import CohortSpec, generate_cohort  # noqa: E402

TINY = dict(n_patients=40, n_external=12, labeled_fraction=0.5, n_ehr_features=12)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A 52-scan synthetic cohort with the default volume size; treat it as read-only."""
    root = tmp_path_factory.mktemp("cohort") / "tiny"
    generate_cohort(root, CohortSpec(**TINY), progress=False)
    return root


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path) -> Path:
    """A private, writable copy of the tiny cohort, for tests that break things."""
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst)
    return dst


def tiny_data_args(root: Path) -> list[str]:
    """CLI arguments pointing a quickstart config at the tiny cohort."""
    return [
        f"--data.init_args.root={root}",
        f"--data.init_args.n_patients={TINY['n_patients']}",
        f"--data.init_args.n_external={TINY['n_external']}",
        f"--data.init_args.labeled_fraction={TINY['labeled_fraction']}",
        f"--data.init_args.n_ehr_features={TINY['n_ehr_features']}",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
    ]
