"""Lightning's private internals are used from jepa_lightning/lightning_internals.py only,
and each one still exists in the installed Lightning (a release that renames one fails here,
in `make test` / `make test-upgrade`, not in a user's run)."""

from __future__ import annotations

import re
from datetime import timedelta

import lightning as L
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from jepa_lightning import lightning_internals as li
from tests.helpers import ROOT

PRIVATE = re.compile(
    r"(trainer|strategy|connector|loop|checkpoint)\._[a-z]\w*"
    r"|_logger_connector|_accelerator_connector|_has_run|_save_topk_checkpoint"
    r"|from lightning[\w.]* import (?:\w+(?: as \w+)?, )*_[A-Za-z]"
)


def test_private_internals_are_used_from_one_module_only():
    offenders = []
    for folder in ("jepa_lightning", "data_modules", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "lightning_internals.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if PRIVATE.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_ddp_timeout_is_the_attribute_lightning_reads():
    assert DDPStrategy(timeout=timedelta(seconds=7))._timeout == timedelta(seconds=7)
    strategy = DDPStrategy()
    li.set_ddp_timeout(strategy, timedelta(seconds=42))
    assert strategy._timeout == timedelta(seconds=42)


def test_the_logger_connector_still_decides_when_logs_are_written(tmp_path):
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    assert hasattr(type(trainer._logger_connector), "should_update_logs")
    assert isinstance(li.logger_writes_this_step(trainer), bool)


def test_the_cluster_environment_is_there_on_one_device(tmp_path, monkeypatch):
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    assert isinstance(li.cluster_environment(trainer), ClusterEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    assert isinstance(li.cluster_environment(trainer), SLURMEnvironment)
