"""Every objective is exact under DDP: one SGD step on 2 gloo processes x B gives the weights
of one step on 1 process x 2B, for every task, with the views and masks fixed
(``tests/ddp_step_worker.py``). Nothing is per-rank by design.

The global batch's labels are spread unevenly (rank 0 holds 1 labelled scan, rank 1 three),
so a mean over labelled scans taken per rank and averaged by DDP would fail here; so would
CLIP without gathered negatives, MSN's mean-entropy on per-rank means, per-rank Sinkhorn
marginals, and per-rank SIGReg / variance statistics. Two launches of 2 gloo processes,
about a minute: in the default suite, since every comparison table rests on it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_step_worker import TASKS
from tests.helpers import ROOT

HANG_GUARD_S = 900
#: ||w_ddp - w_one|| / ||w_one - w_before||, over all parameters: float rounding only
TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, world: int, args: list[str]) -> None:
    """The worker once (world 1) or as ``world`` ranks started the way torchrun does."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank),
            )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.ddp_step_worker", str(out), *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"rank {rank} of {world} failed:\n{output[-6000:]}"


def _relative_difference(one: dict, ddp: dict) -> tuple[float, float]:
    """(||ddp after - one after|| / ||one after - before||, ||one after - before||) over every
    floating-point tensor of the state dict (parameters, EMA targets, buffers)."""
    diff, step = 0.0, 0.0
    for key, before in one["before"].items():
        if not before.is_floating_point():
            continue
        a, b = one["after"][key].double(), ddp["after"][key].double()
        diff += float((a - b).pow(2).sum())
        step += float((a - before.double()).pow(2).sum())
    return diff**0.5 / max(step**0.5, 1e-30), step**0.5


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_steps")
    _launch(out, 1, list(TASKS))
    _launch(out, 2, list(TASKS))
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_one_step_on_two_ranks_equals_one_step_on_one_process(steps, task):
    one = torch.load(steps / f"{task}-rank0-of-1.pt")
    ranks = [torch.load(steps / f"{task}-rank{r}-of-2.pt") for r in range(2)]
    for key, value in ranks[0]["after"].items():  # the replicas agree with each other
        assert torch.equal(value, ranks[1]["after"][key]), f"{task}: ranks differ at {key}"
    for key, value in one["before"].items():  # and started from the same weights
        assert torch.equal(value, ranks[0]["before"][key]), key
    rel, step = _relative_difference(one, ranks[0])
    assert step > 0, f"{task}: the step changed nothing"
    assert rel < TOLERANCE, f"{task}: 2 ranks x B differ from 1 x 2B by {rel:.2e} of the step"


SKIP_TASKS = ["jepa", "msn", "clip", "diagnosis", "longitudinal"]


@pytest.fixture(scope="module")
def skipped_steps(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_skipped")
    _launch(out, 1, ["--empty-rank=1", *SKIP_TASKS])
    _launch(out, 2, ["--empty-rank=1", *SKIP_TASKS])
    return out


@pytest.mark.parametrize("task", SKIP_TASKS)
def test_a_rank_whose_whole_batch_was_skipped_still_steps(skipped_steps, task):
    """With ``on_bad_sample: skip`` one rank's whole batch can be unreadable: that rank steps
    with an empty batch (Lightning refuses ``None`` under DDP), joins every collective, and
    the step equals one process's step on the other rank's samples alone."""
    one = torch.load(skipped_steps / f"{task}-empty1-rank0-of-1.pt")
    ddp = [torch.load(skipped_steps / f"{task}-empty1-rank{r}-of-2.pt") for r in range(2)]
    for key, value in ddp[0]["after"].items():
        assert torch.equal(value, ddp[1]["after"][key]), f"{task}: ranks differ at {key}"
    rel, step = _relative_difference(one, ddp[1])
    assert step > 0
    assert rel < TOLERANCE, f"{task}: {rel:.2e} of the step"
