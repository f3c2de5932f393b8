"""Resuming: where a job starts from under each checkpoint.resume policy, the run-directory guard that lets a job
continue only its own run, the iteration to load, one metrics file across attempts, both stacks' native configs
(load, iteration, save-and-stop signal), and the signal relay that hands a requeue to submitit."""

from __future__ import annotations

import math
import os
import signal

import pytest
from ut_helpers import compose, job_for, native, run_cli, write_run_dir

from unified_train import resume, rundir
from unified_train.runtime.preemption import ExitSignal


def fake_checkpoints(directory, iterations, latest=None):
    """The layout both stacks leave: iter_%07d directories and the tracker naming the latest."""
    os.makedirs(directory, exist_ok=True)
    for it in iterations:
        os.makedirs(rundir.iteration_dir(str(directory), it))
    with open(os.path.join(directory, rundir.CHECKPOINT_TRACKER), "w") as f:
        f.write(str(latest if latest is not None else max(iterations)))
    return str(directory)


def a_run(tmp_path, overrides=(), iterations=(5,)):
    """A run directory as an interrupted training job leaves it: its record, metrics, checkpoints."""
    cfg = compose(list(overrides))
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, "mlm", losses=[10.0, 9.0, 8.0, 7.0, 6.0, 5.5, 5.0])
    rundir.write_job_record(cfg, job_for(cfg, run_dir=str(run_dir)))
    fake_checkpoints(run_dir / rundir.CHECKPOINTS, iterations)
    return cfg, str(run_dir)


# --- where a job starts ------------------------------------------------------------------------------------------


def test_never_ignores_the_run_directorys_own_checkpoints(tmp_path):
    cfg, run_dir = a_run(tmp_path)
    assert resume.start(cfg, run_dir) == resume.Start()


def test_if_available_continues_its_own_latest_checkpoint_before_checkpoint_load(tmp_path):
    other = fake_checkpoints(tmp_path / "other", [3])
    cfg, run_dir = a_run(tmp_path, ["checkpoint.resume=if_available", f"checkpoint.load={other}"], iterations=(2, 4))
    start = resume.start(cfg, run_dir)
    assert start == resume.Start(os.path.join(run_dir, rundir.CHECKPOINTS), None, own=True)
    assert start.iteration_to_load() == 4
    # No checkpoint of its own yet (preempted before the first save): checkpoint.load, then nothing.
    assert resume.start(cfg, str(tmp_path / "fresh")) == resume.Start(other, None)
    assert resume.start(compose(["checkpoint.resume=if_available"]), str(tmp_path / "fresh")) == resume.Start()


def test_an_iteration_directory_is_its_checkpoints_directory_at_that_iteration(tmp_path):
    checkpoints = fake_checkpoints(tmp_path / "ck", [5, 10])
    cfg = compose([f"checkpoint.load={checkpoints}/iter_0000005"])
    assert resume.start(cfg, None) == resume.Start(checkpoints, 5)
    cfg = compose([f"checkpoint.load={checkpoints}", "checkpoint.load_iteration=5"])
    assert resume.start(cfg, None).iteration_to_load() == 5
    assert resume.start(compose([f"checkpoint.load={checkpoints}"]), None).iteration_to_load() == 10


# --- the guard ---------------------------------------------------------------------------------------------------


def test_guard_lets_a_run_continue_only_its_own_run(tmp_path):
    cfg, run_dir = a_run(tmp_path, ["checkpoint.resume=if_available"])
    assert resume.guard(cfg, run_dir, "hydra.run.dir") is None
    never = compose()
    assert "checkpoint.resume=if_available" in resume.guard(never, run_dir, "hydra.run.dir")
    # The same directory, another config: refused, naming what differs (logging does not count).
    other = compose(["checkpoint.resume=if_available", "optim.lr=1e-3", "train.iters=20", "logger=none"])
    problem = resume.guard(other, run_dir, "hydra.run.dir")
    assert problem.startswith("checkpoint.resume=if_available: ") and "differs in optim.lr, train.iters)" in problem


def test_guard_refuses_foreign_directories_and_an_impossible_always(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg = compose(["checkpoint.resume=if_available"])
    assert "holds no unified_train run" in resume.guard(cfg, str(foreign), "run_dir")
    always = compose(["checkpoint.resume=always"])
    assert resume.guard(always, str(tmp_path / "new"), "run_dir").startswith("checkpoint.resume=always: no checkpoint")
    # A sweep directory: each job there guards its own directory when it starts.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}")
    (sweep / "0_mlm").mkdir()
    assert resume.guard(cfg, str(sweep), "hydra.sweep.dir") is None
    assert resume.guard(compose(), str(sweep), "hydra.sweep.dir") is not None


def test_a_finished_run_has_nothing_left_to_do(tmp_path):
    cfg, run_dir = a_run(tmp_path, ["checkpoint.resume=if_available", "train.iters=5"], iterations=(5,))
    assert resume.finished(cfg, run_dir)
    cfg, run_dir = a_run(tmp_path / "b", ["checkpoint.resume=if_available", "train.iters=10"], iterations=(5,))
    assert not resume.finished(cfg, run_dir)


# --- one metrics file across attempts ----------------------------------------------------------------------------


def test_a_continued_run_keeps_one_record_per_iteration(tmp_path):
    from unified_train.results import metrics

    _, run_dir = a_run(tmp_path)  # the first attempt logged 1..7, its last checkpoint is iteration 5
    target = rundir.archive_attempt(run_dir, 5)
    assert target == os.path.join(run_dir, rundir.ATTEMPTS, "1")
    assert [r["iteration"] for r in rundir.read_metrics(target)] == [1, 2, 3, 4, 5, 6, 7]
    assert os.path.exists(os.path.join(target, rundir.SUMMARY)) and not os.path.exists(
        os.path.join(run_dir, rundir.SUMMARY)
    )
    sink = metrics.MetricsSink(run_dir, backend="mlm", tokens_per_iteration=1, world_size=1, write=True, continued=True)
    for it in (6, 7, 8):
        sink.record_train(it, 1.0, 1.0, 1e-4, 0.1)
    sink.close()
    assert [r["iteration"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rundir.archive_attempt(run_dir, 8).endswith(os.path.join(rundir.ATTEMPTS, "2"))


# --- the stacks' native configs ---------------------------------------------------------------------------------


def test_both_stacks_load_the_same_checkpoint_and_iteration(tmp_path):
    checkpoints = fake_checkpoints(tmp_path / "ck", [5, 10])
    cfg = compose([f"checkpoint.load={checkpoints}", "checkpoint.load_iteration=5", "checkpoint.exit_signal=SIGUSR2"])
    argv = native("mlm", cfg).argv
    assert argv[argv.index("--load") + 1] == checkpoints and argv[argv.index("--ckpt-step") + 1] == "5"
    assert "--exit-signal-handler" in argv and argv[argv.index("--exit-signal") + 1] == "SIGUSR2"
    container = native("bridge", cfg).container
    assert (container.checkpoint.load, container.checkpoint.ckpt_step) == (checkpoints, 5)
    assert container.train.exit_signal_handler and container.train.exit_signal == signal.SIGUSR2


def test_resume_settings_leave_the_parity_diff_empty(tmp_path):
    from ut_helpers import describe_both

    from unified_train.modes import parity

    checkpoints = fake_checkpoints(tmp_path / "ck", [5])
    cfg = compose([f"checkpoint.load={checkpoints}/iter_0000005", "checkpoint.exit_signal=SIGUSR1"])
    left, right = describe_both(cfg).values()
    assert parity.diff(left, right) == []
    assert left["checkpoint.ckpt_step"] == 5 and left["train.exit_signal"] == "SIGUSR1"


def test_the_exit_signal_is_submitits_inside_a_submitit_job(monkeypatch):
    from unified_train import config

    assert config.exit_signal(compose()) == "SIGTERM"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert config.exit_signal(compose()) == "SIGUSR2"
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert config.exit_signal(compose()) == "SIGUSR1"
    assert config.exit_signal(compose(["checkpoint.exit_signal=none"])) is None
    assert config.exit_signal(compose(["checkpoint=none"])) is None  # nothing to save


# --- the relay ---------------------------------------------------------------------------------------------------


def test_the_signal_reaches_the_stack_then_the_handler_from_before_the_job():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(("submitit", s)))
    try:
        relay = ExitSignal("SIGUSR1")
        signal.signal(signal.SIGUSR1, lambda s, f: seen.append(("stack", s)))  # the stack replaces the handler
        relay.watch()  # training started
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [("stack", signal.SIGUSR1)] and relay.received
        relay.hand_over()  # the stack stopped
        assert seen[-1] == ("submitit", signal.SIGUSR1)
        assert signal.getsignal(signal.SIGUSR1) is not None and len(seen) == 2
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_without_the_signal_nothing_is_handed_over():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        relay = ExitSignal("SIGUSR1")
        relay.watch()
        relay.hand_over()
        assert seen == [] and not relay.received
    finally:
        signal.signal(signal.SIGUSR1, before)


# --- refused up front --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["checkpoint.load_iteration=5"], "checkpoint.load_iteration is set but checkpoint.load is not"),
        (
            ["checkpoint.load={ck}", "checkpoint.load_iteration=7"],
            "checkpoint.load_iteration=7: {ck} holds iterations 5,10",
        ),
        (["checkpoint.resume=sometimes"], "checkpoint.resume"),
        (
            ["checkpoint.load={bridge}", "parallel.tp=2"],
            "checkpoint.load={bridge} was written by Megatron-Bridge, whose checkpoints carry no Megatron-LM args",
        ),
        (
            [
                "backend=bridge",
                "checkpoint.load={ck}",
                "model=deepseek_v2_lite",
                "parallel.ep=2",
                "parallel.gpus_per_node=2",
            ],
            "shards the RNG",
        ),
        (
            ["mode=preflight", "checkpoint.resume=always", "hydra.run.dir={new}"],
            "checkpoint.resume=always: no checkpoint",
        ),
    ],
)
def test_bad_resume_input_is_one_line(tmp_path, overrides, line):
    checkpoints = fake_checkpoints(tmp_path / "ck", [5, 10])
    bridge = fake_checkpoints(tmp_path / "ck" / "bridge", [5])
    (tmp_path / "ck" / "bridge" / rundir.BRIDGE_TRAIN_STATE).write_bytes(b"")
    fill = dict(ck=checkpoints, new=tmp_path / "new", bridge=bridge)
    proc = run_cli([o.format(**fill) for o in overrides], cwd=tmp_path)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("unified_train:")]
    assert proc.returncode == 2 and len(errors) == 1 and line.format(**fill) in errors[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# --- the resume gate --------------------------------------------------------------------------------------------


def _resumed_run(directory, losses: dict[int, float]):
    from unified_train.results import metrics

    directory.mkdir(parents=True)
    rundir.write_identity(rundir.JobIdentity("mlm", "vanilla_gpt", 1, 1, 1, "p123", run_dir=str(directory)))
    sink = metrics.MetricsSink(str(directory), backend="mlm", tokens_per_iteration=1, world_size=1, write=True)
    for it, loss in losses.items():
        sink.record_train(it, loss=loss, grad_norm=2.0 / it, lr=3e-4 * min(1, it) / it, seconds=0.1)
    sink.close()
    return str(directory)


@pytest.mark.parametrize("tamper, code", [(None, 0), (8, 1)])
def test_compare_resume_judges_the_iterations_after_the_resume(tmp_path, capsys, tamper, code):
    from unified_train.results import compare

    losses = [10.0, 9.5, 9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5]
    continuous = write_run_dir(tmp_path / "continuous", "mlm", losses=losses)
    later = {it: loss for it, loss in enumerate(losses, start=1) if it > 5}
    if tamper:
        later[tamper] = math.nextafter(later[tamper], 0.0)  # the smallest difference there is
    resumed = _resumed_run(tmp_path / "resumed", later)
    assert compare.main(["--resume", str(continuous), resumed]) == code
    out = capsys.readouterr().out
    assert "(iterations 6..10)" in out
    assert ("verdict: **exact (bitwise)**" in out) == (tamper is None)
    table = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table] == [6, 7, 8, 9, 10]


def test_compare_resume_needs_two_run_directories(tmp_path, capsys):
    from unified_train.results import compare

    assert compare.main(["--resume", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run.json" in err
