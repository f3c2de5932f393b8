"""hydra/launcher=slurm: the checks and the sbatch preview on the submitting host, the Slurm environment turned into
torch's rank variables inside a job, and (marker `slurm`) a real sweep through hydra-submitit-launcher on a
single-node Slurm cluster that scripts/local_slurm.sh starts on localhost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import pytest
from ut_helpers import REPO, run_cli, subprocess_env

from unified_train import rundir
from unified_train.runtime import ranks
from unified_train.runtime.ranks import RANK_VARIABLES

LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
# A CPU-only cluster: no GPU is requested, and the job's two tasks are its two ranks (gloo).
CPU_SLURM = [
    "hydra/launcher=slurm",
    "parallel.gpus_per_node=2",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
]


@pytest.fixture
def task_env():
    """Sets a Slurm task's environment; the whole environment is restored afterwards (the code under test
    exports torch's rank variables into os.environ itself)."""
    with mock.patch.dict(os.environ):

        def set_env(**values):
            for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))] + list(RANK_VARIABLES):
                os.environ.pop(key, None)
            os.environ.update({key: str(value) for key, value in values.items()})

        yield set_env


def test_a_slurm_task_becomes_a_torch_rank_without_narrowing_the_gpus(task_env):
    """Task 5 of a 2-node x 4-task step: torch's env:// variables from Slurm's, every GPU still visible."""
    task_env(
        SLURM_JOB_ID=4242,
        SLURM_NTASKS=8,
        SLURM_STEP_NUM_TASKS=8,
        SLURM_JOB_NUM_NODES=2,
        SLURM_NODEID=1,
        SLURM_JOB_NODELIST="gpu[007-008]",
        SLURM_PROCID=5,
        SLURM_LOCALID=1,
        CUDA_VISIBLE_DEVICES="0,1,2,3",
    )
    assert ranks.adopt_slurm_ranks() is True
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
    }
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # the same on every task: seeded by the job id
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_a_batch_script_process_or_torchrun_rank_is_left_alone(task_env):
    task_env(SLURM_JOB_ID=4242, SLURM_NTASKS=1, SLURM_PROCID=0, SLURM_LOCALID=0)
    assert ranks.adopt_slurm_ranks() is False and "RANK" not in os.environ
    task_env(SLURM_JOB_ID=4242, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, RANK=0, WORLD_SIZE=1)
    assert ranks.adopt_slurm_ranks() is False and os.environ["RANK"] == "0"  # torchrun inside an allocation


def test_dry_run_prints_the_sbatch_script_and_starts_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=slurm",
            "backend=mlm,bridge",
            "parallel.nnodes=2",
            "parallel.gpus_per_node=8",
            "train.global_batch_size=64",
            "hydra.launcher.partition=batch",
            "hydra.launcher.account=llm",
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.setup=[source /shared/venv/bin/activate]",
            "+hydra.launcher.additional_parameters.container-image=nvcr.io/nvidia/pytorch:25.09-py3",
            f"hydra.sweep.dir={sweep}",
            "--dry-run",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    table, script = proc.stdout.split("sbatch script for the 2 job(s)")
    assert table.count("| 16 |") == 2  # world size: 2 nodes x 8 GPUs, for both backends
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=batch",
        "#SBATCH --account=llm",
        "#SBATCH --time=30",
        "#SBATCH --container-image=nvcr.io/nvidia/pytorch:25.09-py3",
        "source /shared/venv/bin/activate",
        f"-m submitit.core._submit {sweep}/.submitit/%j",
    ):
        assert line in script, line
    assert not sweep.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hydra/launcher=slurm"], "parallel.gpus_per_node is unset: hydra/launcher=slurm starts one rank per GPU"),
        (
            ["hydra/launcher=slurm", "parallel.gpus_per_node=4", "parallel.dp=8"],
            "parallel.tp*pp*cp*dp = 8 ranks but the Slurm job has 1 node(s) x 4 tasks = 4",
        ),
    ],
)
def test_slurm_sweeps_that_cannot_start_are_refused(tmp_path, overrides, message):
    proc = run_cli(["-m", "backend=mlm,bridge", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert all(line.startswith("unified_train: ") for line in proc.stderr.strip().splitlines())
    assert not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------------------------------------------------------
# A real Slurm: slurmctld + slurmd + munged on localhost, started and stopped by scripts/local_slurm.sh.


@pytest.fixture(scope="module")
def slurm_env():
    """The environment of a running local cluster (SLURM_CONF); the daemons are stopped afterwards whatever
    happens. Skipped, with the daemons' own words, only where the cluster cannot be installed or started."""
    # munged wants every directory above its socket searchable by all (pytest's tmp dirs are private), and a
    # socket path short enough for AF_UNIX.
    state = tempfile.mkdtemp(prefix="ut_slurm_", dir="/tmp")
    os.chmod(state, 0o755)
    env = dict(subprocess_env(), LOCAL_SLURM_DIR=state)
    for step in ("install", "start"):
        proc = subprocess.run(["bash", str(LOCAL_SLURM), step], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)
            pytest.skip(f"a local Slurm cluster cannot be {step}ed here: {proc.stderr.strip()[-500:]}")
    env["SLURM_CONF"] = proc.stdout.strip().removeprefix("export SLURM_CONF=")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slurm
def test_preflight_sweep_runs_as_a_slurm_array_of_two_rank_jobs(slurm_env, tmp_path):
    """backend=mlm,bridge x two seeds = 4 array elements of 2 tasks each: every task is one rank that builds both
    native configs, diffs them and all-reduces; the comparison callback then sums the sweep up."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "unified_train",
        "-m",
        *CPU_SLURM,
        "mode=preflight",
        "backend=mlm,bridge",
        "rng.seed=1,2",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep.glob("*/run.json"))
    assert [d.name for d in job_dirs] == ["0_mlm", "1_mlm", "2_bridge", "3_bridge"]
    slurm_jobs = set()
    for job_dir in job_dirs:
        reports = [json.loads((job_dir / "preflight" / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in reports] == [0, 1] and {r["local_rank"] for r in reports} == {0, 1}
        assert all(r["world_size"] == 2 and r["all_reduce_ok"] for r in reports), reports
        assert all(r["process_env"]["NCCL_NVLS_ENABLE"] == "0" for r in reports)
        assert all(r["parity_differences"] == [] and r["parity_fields"] > 400 for r in reports), reports
        job_ids = {r["slurm_job_id"] for r in reports}
        assert len(job_ids) == 1 and None not in job_ids  # both ranks are tasks of one Slurm job
        slurm_jobs |= job_ids
        assert json.loads((job_dir / "preflight" / "summary.json").read_text())["ok"] is True
    assert len(slurm_jobs) == 4
    assert list(sweep.glob(".submitit/*/*_0_log.out"))  # submitit's logs live in the sweep dir
    report = (sweep / "comparison.md").read_text()
    assert "preflight verdict: **pass** (4 of 4 jobs ok, 2 pairs)" in report
    assert report.count("| [0, 1] |") == 4 and "DIFFERS" not in report


@pytest.mark.slurm
def test_a_preempted_job_saves_is_requeued_and_continues(slurm_env, tmp_path):
    """Slurm signals the job (as it does before a time limit, or on preemption): the stack saves and stops, the
    signal reaches submitit, which requeues the job into the same directory, where checkpoint.resume=if_available
    continues it from that checkpoint. The stack is tests/requeue_standin.py's CPU stand-in; the rest is real."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(REPO / "tests" / "requeue_standin.py"),
        "-m",
        "hydra/launcher=slurm",
        "parallel.gpus_per_node=1",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "~hydra.callbacks.compare",
        "backend=mlm",
        "logger=none",
        "train.iters=12",
        "checkpoint.save_interval=6",
        "checkpoint.resume=if_available",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir, deadline = sweep / "0_mlm", time.monotonic() + 180
    try:
        while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        (job_id,) = [d.name for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_env, check=True, timeout=30)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]

    first = rundir.read_metrics(run_dir / "attempts" / "1")
    stopped = first[-1]["iteration"]
    assert (
        3 <= stopped < 6
        and json.loads((run_dir / "attempts" / "1" / "summary.json").read_text())["stopped_by"] == "SIGUSR2"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == stopped and summary["resumed_own"] and "stopped_by" not in summary
    # One record per iteration, and the state carried across the requeue: x_i = 0.9 x_(i-1) + 1 from x_0 = 1.
    x, expected = 1.0, []
    for _ in range(12):
        x = 0.9 * x + 1.0
        expected.append(x)
    records = rundir.read_metrics(run_dir)
    assert [r["iteration"] for r in records] == list(range(1, 13))
    assert [r["lm loss"] for r in records] == expected
    assert rundir.saved_iterations(str(run_dir / "checkpoints")) == sorted({stopped, 6, 12})
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / job_id).glob("*_log.*"))
    assert "Requeued job" in logs and "SIGUSR2 received: checkpoint saved" in logs
