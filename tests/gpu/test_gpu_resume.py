"""Resumed runs on a GPU (marker `gpu`): exact, as Megatron-LM's resume functional test defines it, made strict.

A run of 2N iterations saving at N, and a run resumed from its iteration-N checkpoint, must have bitwise equal lm
loss, grad norm and lr at every iteration N+1..2N, on each backend, with dropout on (the RNG state is restored) and
indexed data (the data order continues). Then the same across the stacks (a checkpoint of one backend loaded by
the other), and the preemption path: stopped by a signal after a save, started again in its own directory
(checkpoint.resume=if_available), equal to the run that never stopped.

Each command runs both backends in one process (`-m backend=mlm,bridge`) to spend the stacks' imports once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gpu_helpers import REPO, publish, read_metrics, run_unified

from unified_train import rundir
from unified_train.results import compare

pytestmark = pytest.mark.gpu

N = 5
BACKENDS = ("mlm", "bridge")
# vanilla_gpt trains with dropout (hidden 0.1, attention 0.1); a job directory is named by its backend, so that one
# override `checkpoint.load=.../${backend.name}/...` points each half at its own (or, through links, the other's).
COMMON = ["logger=none", f"train.iters={2 * N}", f"checkpoint.save_interval={N}"]
BY_BACKEND = "hydra.sweep.subdir=${backend.name}"


@pytest.fixture(scope="module")
def indexed_data(tmp_path_factory) -> list[str]:
    from ut_helpers import write_hf_tokenizer, write_indexed_prefix

    root = tmp_path_factory.mktemp("data")
    write_indexed_prefix(root / "corpus", 600, 0)
    tokenizer = write_hf_tokenizer(root / "tokenizer")
    return [
        "data=indexed",
        f"data.tokenizer_model={tokenizer}",
        "data.split='90,5,5'",
        f"data.data_path=['{root}/corpus']",
    ]


@pytest.fixture(scope="module")
def continuous(tmp_path_factory, indexed_data) -> Path:
    """The reference: 2N iterations, saving at N and 2N."""
    sweep = tmp_path_factory.mktemp("resume") / "continuous"
    run_unified(
        ["-m", "backend=mlm,bridge", f"hydra.sweep.dir={sweep}", BY_BACKEND, *COMMON, *indexed_data],
        sweep.with_suffix(".log"),
    )
    return sweep


def _after(metrics: list[dict], n: int) -> list[dict]:
    return [m for m in metrics if m["iteration"] > n]


def _assert_exact_after(reference: Path, resumed: Path, n: int = N) -> None:
    ref, res = _after(read_metrics(reference), n), read_metrics(resumed)
    assert [m["iteration"] for m in res] == list(range(n + 1, 2 * N + 1))
    for key in compare.EXACT_KEYS:
        assert [m[key] for m in res] == [m[key] for m in ref], f"{key}: {resumed} vs {reference}"


@pytest.fixture(scope="module")
def resumed(continuous, indexed_data) -> Path:
    """From iteration N: each backend from its own checkpoint (`same/`) and from the other backend's (`cross/`),
    four jobs in one process. A failing job is recorded and the sweep goes on, so both directions are measured."""
    root = continuous.parent
    for kind, source in (("same", {b: b for b in BACKENDS}), ("cross", {"mlm": "bridge", "bridge": "mlm"})):
        for backend in BACKENDS:
            link = root / "links" / kind / backend
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(continuous / source[backend] / rundir.CHECKPOINTS)
    sweep = root / "resumed"
    log = root / "resumed.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TORCHDYNAMO_DISABLE", None)
    with open(log, "w") as f:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "unified_train",
                "-m",
                "backend=mlm,bridge",
                f"checkpoint.load={root}/links/same/${{backend.name}},{root}/links/cross/${{backend.name}}",
                f"checkpoint.load_iteration={N}",
                f"hydra.sweep.dir={sweep}",
                *COMMON,
                "hydra.sweep.subdir=${hydra.job.num}_${backend.name}",
                *indexed_data,
            ],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    publish("resumed", log.read_text()[-4000:])
    return sweep


def _resumed_dir(sweep: Path, backend: str, kind: str) -> Path:
    for run_json in sweep.glob("*/run.json"):
        job_dir = run_json.parent
        cfg = rundir.read_unified_config(str(job_dir))
        if cfg.backend.name == backend and f"/links/{kind}/" in cfg.checkpoint.load:
            return job_dir
    raise AssertionError(f"no {backend} job resumed from {kind} under {sweep}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_run_equals_the_continuous_run_bitwise(continuous, resumed, backend):
    resumed_dir = _resumed_dir(resumed, backend, "same")
    _assert_exact_after(continuous / backend, resumed_dir)
    summary = json.loads((resumed_dir / rundir.SUMMARY).read_text())
    assert summary["resumed_from"] == N and not summary["resumed_own"]
    # The comparison command gives the same verdict.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "unified_train.results.compare",
            "--resume",
            str(continuous / backend),
            str(resumed_dir),
        ],
        capture_output=True,
        text=True,
    )
    publish(f"compare --resume ({backend})", done.stdout)
    assert done.returncode == 0 and "exact (bitwise)" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_of_the_other_stack_resumes_exactly(continuous, resumed, backend):
    """The continuous pair is bitwise, so a resume from the other stack's checkpoint must reproduce it too."""
    resumed_dir = _resumed_dir(resumed, backend, "cross")
    assert (resumed_dir / rundir.SUMMARY).exists(), (
        (resumed_dir / "failure.json").read_text()
        if (resumed_dir / "failure.json").exists()
        else f"{resumed_dir}: no summary"
    )
    _assert_exact_after(continuous / backend, resumed_dir)


def _signal_when(run_dirs: list[Path], at_iteration: int, pid: int, signum: int, stop: threading.Event) -> None:
    """Sends `signum` to `pid` once each run directory (in order) has logged `at_iteration`."""
    for run_dir in run_dirs:
        while not stop.is_set():
            metrics = run_dir / rundir.METRICS
            if metrics.exists() and len(metrics.read_text().splitlines()) >= at_iteration:
                os.kill(pid, signum)
                break
            time.sleep(0.05)


def test_stopped_by_a_signal_then_continued_in_its_own_directory_is_exact(continuous, indexed_data):
    sweep = continuous.parent / "preempted"
    args = [
        "-m",
        "unified_train",
        "-m",
        "backend=mlm,bridge",
        f"hydra.sweep.dir={sweep}",
        "checkpoint.resume=if_available",
        "checkpoint.exit_signal=SIGUSR2",
        BY_BACKEND,
        *COMMON,
        *indexed_data,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TORCHDYNAMO_DISABLE", None)
    stop = threading.Event()
    with open(continuous.parent / "preempted.log", "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        watcher = threading.Thread(
            target=_signal_when, args=([sweep / b for b in BACKENDS], 2, proc.pid, signal.SIGUSR2, stop)
        )
        watcher.start()
        proc.wait()
        stop.set()
        watcher.join()
    assert proc.returncode == 0, (continuous.parent / "preempted.log").read_text()[-3000:]
    stopped = {}
    for backend in BACKENDS:
        summary = json.loads((sweep / backend / rundir.SUMMARY).read_text())
        assert summary["stopped_by"] == "SIGUSR2"
        stopped[backend] = rundir.latest_iteration(str(sweep / backend / rundir.CHECKPOINTS))
        assert 2 <= stopped[backend] < N, stopped
    # Started again, the same command: each job continues its own run.
    run_unified(args[2:], continuous.parent / "continued.log")
    for backend in BACKENDS:
        summary = json.loads((sweep / backend / rundir.SUMMARY).read_text())
        assert summary["resumed_from"] == stopped[backend] and summary["resumed_own"]
        _assert_exact_after(continuous / backend, sweep / backend, n=0)
