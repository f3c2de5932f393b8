"""A failed job says why in its run directory, and a multirun with failed jobs still writes its comparison, lists
them, and exits non-zero; a single failing run exits as it always did."""

from __future__ import annotations

import json
import os

import pytest
from ut_helpers import compose, run_cli

from unified_train import rundir
from unified_train.runtime import failures


@pytest.fixture
def one_gpu_on_paper(tmp_path):
    """This machine has no GPU: an `nvidia-smi` stand-in reports one (an H100's 81559 MiB), so the up-front checks
    pass and each training job reaches app.run, where torch finds no CUDA device and the job is refused for real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 81559\n")
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"}


NO_CUDA = "no CUDA GPU is visible: training needs one (mode=parity and mode=export run on CPU)"


def test_a_pair_whose_jobs_fail_is_reported_and_the_multirun_exits_non_zero(tmp_path, one_gpu_on_paper):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", "backend=mlm,bridge", "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path, env=one_gpu_on_paper
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count(f"unified_train: {NO_CUDA}") == 2  # both points ran: the first failure ended nothing
    report = (sweep / rundir.COMPARISON_MD).read_text()
    reason = f"JobFailed, exit code 2: {NO_CUDA}"
    assert (
        report.splitlines()[2] == f"summary: 1 pair: 1 incomplete; 2 failed jobs: 0_mlm ({reason}); 1_bridge ({reason})"
    )
    assert f"**incomplete**: mlm failed ({reason}); bridge failed ({reason})" in report
    assert f"- `0_mlm` (mlm, pair {rundir.pair_id(compose(['logger=none']))}): {reason}" in report
    for num, backend in enumerate(("mlm", "bridge")):
        job_dir = sweep / f"{num}_{backend}"
        failure = json.loads((job_dir / rundir.FAILURE).read_text())
        assert (failure["error"], failure["message"], failure["exit_code"]) == ("JobFailed", NO_CUDA, 2)
        assert json.loads((job_dir / rundir.RUN_JSON).read_text())["backend"] == backend  # found and paired


def test_a_single_failing_run_exits_as_before_and_writes_nothing(tmp_path, one_gpu_on_paper):
    run_dir = tmp_path / "run"
    proc = run_cli(["backend=mlm", f"hydra.run.dir={run_dir}"], tmp_path, env=one_gpu_on_paper)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"unified_train: {NO_CUDA}"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".hydra" and not p.name.endswith(".log")) == []


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_the_failure_record_of_an_exception_and_of_an_exit():
    record = rundir.failure_record(_raised(KeyError("missing")), rank=3)
    assert (record["error"], record["message"], record["exit_code"], record["rank"]) == (
        "KeyError",
        "'missing'",
        None,
        3,
    )
    assert record["traceback"][0] == "Traceback (most recent call last):"
    assert record["traceback"][-1] == "KeyError: 'missing'"
    long = rundir.failure_record(_raised(ValueError("\n".join(f"line {i}" for i in range(30)))))
    assert len(long["traceback"]) == rundir.FAILURE_TAIL and long["traceback"][-1] == "line 29"  # the end is kept
    assert rundir.failure_record(_raised(SystemExit(3)))["exit_code"] == 3
    assert rundir.failure_record(_raised(SystemExit("stack said no")))["exit_code"] == 1  # as Python exits for it
    assert rundir.failure_record(failures.JobFailed("refused"), exit_code=2)["traceback"] == []


def test_the_first_failure_of_a_run_is_kept_and_a_new_attempt_drops_it(tmp_path):
    job = rundir.identity(compose(), world_size=1, sweep_id="s", run_dir=str(tmp_path / "job"))
    with pytest.raises(ValueError), failures.recorded(job, new_attempt=False):  # a spawned rank: its own cause
        raise ValueError("rank 1 ran out of memory")
    with pytest.raises(RuntimeError), failures.recorded(job, new_attempt=False):  # the parent: "a child failed"
        raise RuntimeError("a child process failed")
    assert rundir.read_failure(job.run_dir)["message"] == "rank 1 ran out of memory"
    assert json.loads((tmp_path / "job" / rundir.RUN_JSON).read_text())["pair_id"] == job.pair_id
    with pytest.raises(SystemExit), failures.recorded(job):  # a new attempt that ends cleanly (exit 0)
        raise SystemExit(0)
    assert rundir.read_failure(job.run_dir) is None


def test_a_stacks_exit_fails_only_its_job_in_a_sweeps_own_process(tmp_path, monkeypatch):
    """Hydra's basic launcher runs the jobs in its own process, where a SystemExit would end the sweep: in a multirun
    it becomes the job's failure. A single run exits as before, and so does a submitit job (its own process; submitit
    requeues a job by exiting)."""
    cfg = compose()
    swept = rundir.identity(cfg, world_size=1, sweep_id="s", run_dir=str(tmp_path / "swept"))
    with pytest.raises(failures.JobFailed, match="the job exited with status 3$"), failures.recorded(swept):
        raise SystemExit(3)
    assert rundir.read_failure(swept.run_dir)["exit_code"] == 3
    single = rundir.identity(cfg, world_size=1, run_dir=str(tmp_path / "single"))
    with pytest.raises(SystemExit) as exited, failures.recorded(single):
        raise SystemExit(3)
    assert exited.value.code == 3 and rundir.read_failure(single.run_dir)["exit_code"] == 3
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(SystemExit), failures.recorded(swept):
        raise SystemExit(-1)
