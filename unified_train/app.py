"""Mode dispatch: Hydra hands each job's config here. The job's identity (world size, pair id, sweep, run
directory) is computed once, here, and handed down; nothing imports this module."""

from __future__ import annotations

import os
import sys

from unified_train import config as C
from unified_train import resources, resume, rundir
from unified_train.results.metrics import process_seconds
from unified_train.runtime import env, failures, ranks


def run(cfg) -> None:
    task_started = process_seconds()
    cfg = _what_runs(cfg)
    os.environ.update(env.process_env(cfg))  # before torch is imported: some settings are read at import
    ranks.adopt_slurm_ranks()  # before the world size is read: MLM reads RANK/WORLD_SIZE while parsing
    builds_only = cfg.mode in C.BUILDS_ONLY_MODES
    run_dir = cfg.run_dir if builds_only else cfg.run_dir or _hydra_output_dir()
    job = rundir.identity(cfg, world_size=resources.world_size(cfg), sweep_id=_sweep_id(), run_dir=run_dir)
    if builds_only:  # in a Slurm job (validate.write_nothing): build_natives runs the others, without Hydra
        return _finish(_build(cfg, job), job)
    problem = resume.guard(cfg, job.run_dir, rundir.output_dir_key(cfg, multirun=job.multirun))
    if problem:
        _refuse(problem)
    if cfg.mode == "train" and resume.finished(cfg, job.run_dir):  # e.g. requeued after its last save
        print(f"unified_train: {job.run_dir} already holds this run, trained to the end: nothing to do", flush=True)
        return
    if cfg.mode == "preflight":
        from unified_train.modes import preflight

        return _finish(preflight.run(cfg, job), job)
    if not _cuda_available():
        _refuse("no CUDA GPU is visible: training needs one (mode=parity and mode=export run on CPU)", job)
    from unified_train.runtime import job as training_job

    with failures.recorded(job):  # failure.json in the run directory, for the comparison (runtime/failures.py)
        training_job.run(cfg, job, task_started)


def build_natives(points) -> int:
    """mode=parity and mode=export for every job of the command line (validate.write_nothing), in this process and
    outside Hydra's job machinery, which would create a run directory, its .hydra/ record and a log file for output
    that only goes to stdout (tests/test_export.py, tests/test_parity.py). The exit status: 1 if a
    parity diff is not empty."""
    status = 0
    for point in points:
        if len(points) > 1:  # a comment line: `mode=export -m ... > cmds.sh` stays a script
            print(f"# [{' '.join(point.overrides)}]", flush=True)
        job = rundir.identity(point.cfg, world_size=resources.world_size(point.cfg), run_dir=point.cfg.run_dir)
        status = max(status, _build(point.cfg, job))
    return status


def _build(cfg, job: rundir.JobIdentity) -> int:
    if cfg.mode == "parity":
        from unified_train.modes import parity

        return parity.main(cfg, job)
    from unified_train.modes import export

    print(export.render(cfg, job), flush=True)
    return 0


def _what_runs(cfg):
    """The config the job trains: mode=numerics is one recorded iteration of the user's run (its identity too)."""
    if cfg.mode != "numerics":
        return cfg
    from unified_train.modes import numerics

    return numerics.job_config(cfg)


STACK_NAMES = {"mlm": "Megatron-LM", "bridge": "Megatron-Bridge"}


def stack_problem(cfg) -> str | None:
    """The stack's own rules, for a config the up-front checks passed: the job's native config is built on the CPU
    as the job will build it (MLM: its parse_args and validate_args; Bridge: its overrides and
    ConfigContainer.validate), so a rule a new stack version adds is picked up, not re-typed. What the stack raises
    becomes one line naming our key (tests/test_stack_checks.py)."""
    import contextlib
    import io

    from unified_train import backends

    cfg = _what_runs(cfg)
    job = rundir.identity(cfg, world_size=resources.world_size(cfg))
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()), env.job_environment(cfg):
            backends.get(cfg.backend.name).native_config(cfg, job)
    except BaseException as exc:  # noqa: BLE001 -- SystemExit too: MLM's argparse exits on a bad flag
        return _refusal_line(cfg, exc, said.getvalue())
    return None


def _refusal_line(cfg, exc: BaseException, stderr: str) -> str:
    import re
    import traceback

    from unified_train import mcore_fields

    errors = [line.split("error: ", 1)[1] for line in stderr.splitlines() if "error: " in line]
    message = errors[-1] if isinstance(exc, SystemExit) and errors else str(exc).strip()
    if not message:  # a bare `assert`: its own source line says what it checks
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = frame.filename.split("site-packages/")[-1]
        message = f"{type(exc).__name__} at {where}:{frame.lineno}: {frame.line}"
    message = " ".join(message.split())[:300]
    words = {w.replace("-", "_") for w in re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", message)}
    extra = [e for e in cfg.backend.extra if any(w.replace("-", "_") in words for w in re.findall(r"[\w-]+", e))]
    if extra or "unrecognized arguments" in message or "override" in message.lower():
        keys = ["backend.extra"]
    else:
        keys = mcore_fields.unified_keys(cfg, sorted(words & set(mcore_fields.all_fields(cfg))))
    stack = STACK_NAMES[cfg.backend.name]
    fix = f"change {' or '.join(keys)}" if keys else "change the config"
    return f"{', '.join(keys) or 'backend=' + cfg.backend.name}: {stack} refuses it: {message}; {fix}"


def _refuse(problem: str, job: rundir.JobIdentity | None = None) -> None:
    """Exit 2 with one line. A job of a multirun (given `job`) fails instead and the sweep goes on; its failure is
    recorded for the comparison (tests/test_failures.py). Without `job` (its directory holds another run's output,
    which is not ours to write into), the refusal stays an exit."""
    print(f"unified_train: {problem}", file=sys.stderr)
    if job is not None and job.multirun:
        failures.fail(job, problem, exit_code=2)
    sys.exit(2)


def _finish(status: int, job: rundir.JobIdentity) -> None:
    """A failed check ends a single run with its exit status; in a multirun the job fails and the sweep goes on
    (Hydra's launcher records the exception), so every point gets checked."""
    if status == 0:
        return
    if not job.multirun:
        sys.exit(status)
    failures.fail(job, f"job failed its check (status {status})", exit_code=status)


def _sweep_id() -> str:
    """The multirun's sweep directory name (tags the W&B runs of one sweep), or rundir.SINGLE."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return os.path.basename(hc.sweep.dir.rstrip("/")) if hc.mode == RunMode.MULTIRUN else rundir.SINGLE


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
