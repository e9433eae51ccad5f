"""Surviving a killed job: ``kill -9`` then ``--ckpt_path last``, atomic checkpoint writes,
truncated checkpoints, ``weights_only`` loading."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from jepa_lightning.checkpoints import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    check_checkpoint,
    resolve_last,
)
from jepa_lightning.main import main
from tests.conftest import tiny_data_args
from tests.helpers import QUICKSTART_PRETRAIN as PRETRAIN
from tests.helpers import QUIET, ROOT

HANG_GUARD_S = 1200


def _args(run: Path, cohort: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", PRETRAIN,
        f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
        *tiny_data_args(cohort), *QUIET, "--trainer.limit_val_batches=0",
        "--trainer.check_val_every_n_epoch=1", "--checkpoint.monitor=null", *extra,
    ]  # fmt: skip


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- unit level ------------------------------------------------------------------------------
def test_check_checkpoint_names_a_truncated_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    check_checkpoint(good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes())
    _truncate(bad)
    with pytest.raises(CorruptCheckpointError, match=r"bad\.ckpt.*truncated"):
        check_checkpoint(bad)
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(CorruptCheckpointError, match="empty.ckpt"):
        check_checkpoint(empty)


def test_resolve_last_falls_back_to_the_newest_good_checkpoint(tmp_path):
    ckpts, root = tmp_path / "checkpoints", tmp_path
    ckpts.mkdir()
    older = ckpts / "epoch=0-step=3.ckpt"
    torch.save({"step": 3}, older)
    last = ckpts / "last.ckpt"
    torch.save({"step": 6}, last)
    hpc = root / "hpc_ckpt_1.ckpt"
    torch.save({"step": 8}, hpc)
    for i, p in enumerate((older, last, hpc)):
        os.utime(p, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert resolve_last(ckpts, root) == hpc  # SLURM's HPC checkpoint is a candidate too
    _truncate(hpc)
    with pytest.warns(UserWarning, match=r"hpc_ckpt_1\.ckpt"):
        assert resolve_last(ckpts, root) == last
    _truncate(last)
    _truncate(older)
    with pytest.raises(CorruptCheckpointError, match="no usable") as err:
        resolve_last(ckpts, root)
    assert all(p.name in str(err.value) for p in (older, last, hpc))  # every bad file named
    assert resolve_last(tmp_path / "none", tmp_path / "none") is None  # first start


def test_atomic_save_leaves_the_previous_file_when_the_write_fails(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left over


def test_cli_uses_atomic_io(tiny_cohort, tmp_path):
    cli = main(_args(tmp_path, tiny_cohort, "--trainer.fast_dev_run=true"))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --- through the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epochs(tiny_cohort, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two_epochs")
    main(_args(run, tiny_cohort, "--trainer.max_epochs=2", "--checkpoint.save_top_k=-1"))
    return run


def test_truncated_last_falls_back_and_says_so(two_epochs, tiny_cohort, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for p in (two_epochs / "checkpoints").glob("*.ckpt"):
        (run / "checkpoints" / p.name).write_bytes(p.read_bytes())
    (older,) = (run / "checkpoints").glob("epoch=0-*.ckpt")
    (good,) = (run / "checkpoints").glob("epoch=1-*.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    _truncate(last)
    for i, p in enumerate((older, good, last)):  # the order they were written in
        os.utime(p, ns=(10**18 + i * 10**9,) * 2)
    with pytest.warns(UserWarning, match=r"last\.ckpt.*truncated"):
        cli = main(_args(run, tiny_cohort, "--trainer.max_epochs=3", "--ckpt_path=last"))
    assert cli.trainer.ckpt_path == str(good)
    assert cli.trainer.global_step == 3 * 3


def test_explicit_truncated_checkpoint_is_named(two_epochs, tiny_cohort, tmp_path):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes((two_epochs / "checkpoints" / "last.ckpt").read_bytes())
    _truncate(bad, 0.9)
    with pytest.raises((CorruptCheckpointError, SystemExit), match=r"cut\.ckpt"):
        main(_args(tmp_path, tiny_cohort, f"--ckpt_path={bad}"))


def test_checkpoints_load_weights_only(two_epochs, tiny_cohort, tmp_path):
    ckpt = torch.load(two_epochs / "checkpoints" / "last.ckpt", weights_only=True)  # no pickle
    assert "RNGStateCheckpoint" in ckpt["callbacks"]
    ckpt["evil"] = pickle.loads(pickle.dumps(zipfile.ZipInfo("x")))  # an arbitrary object
    tampered = tmp_path / "tampered.ckpt"
    torch.save(ckpt, tampered)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        main(_args(tmp_path, tiny_cohort, "--trainer.max_epochs=3", f"--ckpt_path={tampered}"))


# --- kill -9 in the middle of a run ------------------------------------------------------------
def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "jepa_lightning", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip


def _losses(path: Path) -> dict[int, str]:
    """step -> loss as written (repr, so equality is bit equality)."""
    out = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = loss
    return out


@pytest.mark.slow
def test_kill_9_then_resume_matches_the_uninterrupted_run(tiny_cohort, tmp_path):
    steps_per_epoch, epochs = 3, 4  # 28 training scans, batch 8, drop_last
    common = ["--trainer.max_epochs", str(epochs), "--trainer.deterministic=true"]
    log_cb = "tests.rank_recorder.StepLossLog"

    ref = tmp_path / "uninterrupted"
    proc = _run_cli(_args(ref, tiny_cohort, *common, f"--trainer.callbacks+={log_cb}",
                          f"--trainer.callbacks.path={ref}.txt"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    run = tmp_path / "killed"
    killed = _run_cli(_args(run, tiny_cohort, *common, f"--trainer.callbacks+={log_cb}",
                            f"--trainer.callbacks.path={run}.txt",
                            "--trainer.callbacks+=tests.rank_recorder.KillAt",
                            "--trainer.callbacks.step=8"))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert max(_losses(Path(f"{run}.txt"))) == 8  # died mid-epoch 3, after step 8
    resumed = _run_cli(_args(run, tiny_cohort, *common, "--ckpt_path=last",
                             f"--trainer.callbacks+={log_cb}",
                             f"--trainer.callbacks.path={run}-resumed.txt"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    reference = _losses(Path(f"{ref}.txt"))
    after = _losses(Path(f"{run}-resumed.txt"))
    assert min(after) == 2 * steps_per_epoch + 1  # from the end of epoch 2 (last.ckpt)
    assert max(after) == max(reference) == epochs * steps_per_epoch  # finished as planned
    assert after == {s: reference[s] for s in after}, "resumed loss curve differs"
    a = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
