"""A real SLURM on this host (``experiments/slurm/local_cluster.sh``: munged + slurmctld +
two slurmd emulating two nodes) running the repository's sbatch templates as CPU DDP jobs.

1. The single-node template, 2 tasks on one node, trains to its planned step.
2. That job gets ``scancel --signal=USR1`` mid-run: at the next step boundary the ranks save
   ``hpc_ckpt_1.ckpt`` together and rank 0 requeues the job
   (:class:`jepa_lightning.slurm_requeue.SlurmRequeue`); the requeued job resumes and
   finishes.
3. The multi-node template, 1 task on each of the 2 nodes: one DDP world across the nodes
   (node ranks 0 and 1, master found from ``SLURM_NODELIST``).

When SLURM cannot be installed or started the test is skipped with the reason, except in CI
(``CI=true``), where it fails with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY
from tests.helpers import ROOT

CLUSTER = ROOT / "experiments" / "slurm" / "local_cluster.sh"
TEMPLATE = ROOT / "experiments" / "slurm" / "single_node.sbatch"
MULTI_NODE_TEMPLATE = ROOT / "experiments" / "slurm" / "multi_node.sbatch"
PRETRAIN = ROOT / "experiments" / "quickstart" / "pretrain.yaml"
POLL_S = 2.0
HANG_GUARD_S = 1500  # a job that never ends fails the test instead of stalling CI

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SLURM could not be started in CI: {reason}")
    pytest.skip(f"SLURM not available: {reason}")


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (slurmctld, then one per slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n > 65000:
            continue
        try:
            for offset in range(1, n):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {n} consecutive free ports for slurmctld and the slurmds")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """Environment (``SLURM_CONF``) of a freshly started two-node cluster on this host."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT": str(_free_ports(3)),
           "SLURM_LOCAL_NODES": "2"}  # fmt: skip
    if not shutil.which("slurmctld"):
        if not shutil.which("apt-get") or os.geteuid() != 0:
            _unavailable("slurm-wlm is not installed and this is not a root Debian host")
        proc = subprocess.run(
            ["bash", str(CLUSTER), "install"], env=env, capture_output=True, text=True
        )
        if proc.returncode:
            _unavailable(f"install failed: {proc.stderr.strip()[-2000:]}")
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True)
    if proc.returncode:
        _unavailable(f"start failed: {proc.stderr.strip()[-3000:]}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True)


def cpu_job_script(
    tmp: Path, template: Path = TEMPLATE, nodes: int = 1, tasks_per_node: int = 2
) -> Path:
    """A template unchanged except for its size and that these nodes have CPUs, not GPUs."""
    text = template.read_text()
    text = re.sub(r"^#SBATCH --gpus-per-node=.*\n", "", text, flags=re.M)
    for option, value in (
        ("cpus-per-task", 1),
        ("nodes", nodes),
        ("ntasks-per-node", tasks_per_node),
    ):
        text, n = re.subn(
            rf"^#SBATCH --{option}=.*$", f"#SBATCH --{option}={value}", text, flags=re.M
        )
        assert n == 1, f"{template.name} has no '#SBATCH --{option}=' line"
    assert "srun" in text and "--signal=SIGUSR1@90" in text and "--requeue" in text
    script = tmp / f"cpu_{template.name}"
    script.write_text(text)
    return script


def job_config(tmp: Path, cohort: Path, run: Path, max_steps: int) -> Path:
    cfg = yaml.safe_load(PRETRAIN.read_text())
    cfg["trainer"].update(
        max_epochs=-1,
        max_steps=max_steps,  # a resume from a mid-epoch HPC checkpoint ends at this step
        limit_val_batches=0,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            {"class_path": "tests.rank_recorder.RankRecorder", "init_args": {"out_dir": str(run)}},
            {"class_path": "tests.rank_recorder.StepLossLog", "init_args": {"path": f"{run}.steps"}},
        ],
    )  # fmt: skip
    cfg["model"]["init_args"].update(backbone={"depth": 2})
    cfg["data"]["init_args"].update(
        root=str(cohort), n_patients=TINY["n_patients"], n_external=TINY["n_external"],
        labeled_fraction=TINY["labeled_fraction"], n_ehr_features=TINY["n_ehr_features"],
        batch_size=4, num_workers=0,
    )  # fmt: skip
    cfg["checkpoint"] = {"save_last": True, "monitor": None}
    path = tmp / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(env: dict, script: Path, config: Path, run: Path) -> str:
    job_env = {**env, "CONFIG": str(config), "RUN_DIR": str(run), "ACCELERATOR": "cpu",
               "PRECISION": "32-true", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
               "WANDB_MODE": "offline"}  # fmt: skip
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={run.name}", f"--output={run}.out", str(script)],
        env=job_env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(env: dict, job: str, done, what: str) -> dict[str, str]:
    start = time.monotonic()
    while time.monotonic() - start < HANG_GUARD_S:
        info = job_info(env, job)
        if done(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(POLL_S)
    raise AssertionError(f"job {job}: waiting for {what}, got {info}")


def finished(info: dict) -> bool:
    return info.get("JobState") == "COMPLETED"


def report(name: str, info: dict, run: Path) -> None:
    print(f"{name}: job {info.get('JobId')} {info.get('JobState')} restarts={info.get('Restarts')} "
          f"submit={info.get('SubmitTime')} start={info.get('StartTime')} end={info.get('EndTime')} "
          f"run time={info.get('RunTime')}; log {run}.out")  # fmt: skip


def test_sbatch_ddp_job_trains(slurm, tiny_cohort, tmp_path):
    run = tmp_path / "train"
    job = submit(slurm, cpu_job_script(tmp_path), job_config(tmp_path, tiny_cohort, run, 6), run)
    info = wait_for(slurm, job, finished, "completion")
    report("plain job", info, run)
    assert info["ExitCode"] == "0:0", Path(f"{run}.out").read_text()[-4000:]
    ranks = [torch.load(run / f"fit_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # two SLURM tasks = one DDP world
    steps_per_epoch = 28 // 2 // 4  # 28 training scans, 2 ranks, batch 4, drop_last
    assert ranks[0]["global_step"] == 2 * steps_per_epoch
    a, b = (r["state_dict"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(ranks[0]["train_scans"][0]).isdisjoint(ranks[1]["train_scans"][0])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * steps_per_epoch
    log = Path(f"{run}.out").read_text()
    assert "SLURM" in log or "GLOBAL_RANK: 1" in log


def test_usr1_saves_hpc_checkpoint_requeues_and_resumes(slurm, tiny_cohort, tmp_path):
    run = tmp_path / "requeue"
    epochs, steps_per_epoch = 20, 28 // 2 // 4
    job = submit(
        slurm,
        cpu_job_script(tmp_path),
        job_config(tmp_path, tiny_cohort, run, epochs * steps_per_epoch),
        run,
    )
    steps_file = Path(f"{run}.steps")
    start = time.monotonic()
    while not (steps_file.exists() and len(steps_file.read_text().splitlines()) >= 2 * 4):
        assert time.monotonic() - start < HANG_GUARD_S, f"job {job} never trained"
        assert job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING"), job_info(slurm, job)
        time.sleep(POLL_S)
    signalled_at = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = wait_for(
        slurm, job, lambda i: finished(i) and i.get("Restarts") == "1", "requeue and completion"
    )
    report("requeued job", info, run)
    print(f"from SIGUSR1 to completion after requeue: {time.monotonic() - signalled_at:.0f} s")
    log = Path(f"{run}.out").read_text()
    hpc = run / "hpc_ckpt_1.ckpt"
    assert hpc.exists(), log[-4000:]
    saved_step = torch.load(hpc, weights_only=True)["global_step"]
    assert 0 < saved_step < epochs * steps_per_epoch
    assert "restart 1" in log  # the template's banner of the requeued start
    # The requeued run resumes from the newest complete checkpoint (`--ckpt_path=last`): the
    # HPC one, or — when the first run finished an epoch between saving it and being stopped
    # (seen on a loaded machine) — the later last.ckpt. Either way it continues, no step lost
    # or repeated beyond that checkpoint.
    restored = re.findall(r"Restored all states from the checkpoint at (\S+)", log)
    assert restored and Path(restored[-1]) in {hpc, run / "checkpoints" / "last.ckpt"}, log[-4000:]
    first_run_steps = [int(line.split()[0]) for line in steps_file.read_text().splitlines()]
    ranks = [torch.load(run / f"fit_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:  # written by the requeued run only (the first one was stopped)
        steps = [s for s, _ in rank["losses"]]
        resumed_from = steps[0] - 1
        assert saved_step <= resumed_from <= max(first_run_steps), (saved_step, resumed_from)
        if Path(restored[-1]) == hpc:
            assert resumed_from == saved_step
        assert steps == list(range(steps[0], epochs * steps_per_epoch + 1))
    a, b = (r["state_dict"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multi_node_template_runs_one_ddp_world_over_two_nodes(slurm, tiny_cohort, tmp_path):
    run = tmp_path / "multinode"
    script = cpu_job_script(tmp_path, MULTI_NODE_TEMPLATE, nodes=2, tasks_per_node=1)
    job = submit(slurm, script, job_config(tmp_path, tiny_cohort, run, 6), run)
    info = wait_for(slurm, job, finished, "completion")
    report("multi-node job", info, run)
    log = Path(f"{run}.out").read_text()
    assert info["ExitCode"] == "0:0", log[-4000:]
    assert info["NumNodes"] == "2", info
    ranks = [torch.load(run / f"fit_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]  # one process per node
    assert len({r["slurm_node"] for r in ranks}) == 2, [r["slurm_node"] for r in ranks]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    a, b = (r["state_dict"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(ranks[0]["train_scans"][0]).isdisjoint(ranks[1]["train_scans"][0])
