"""A failed job says why in its own run directory (rundir.FAILURE), so the comparison after a multirun lists it with
its exit reason and the end of its traceback, whatever process or host ran it. The job still fails: the exception
goes on up, and a single run exits exactly as it did without the record.

In a multirun, a job that ends itself (a refusal, a failed check) raises `JobFailed` instead of exiting, and so does a
job whose stack exits (MLM's exit paths raise SystemExit) while it runs in the sweep's own process: Hydra's launchers
record an Exception as that job's failure and run the other points, where a SystemExit would end the whole sweep. In
a submitit job the SystemExit stays (submitit's requeue exits so, and the job is a process of its own). The comparison
is written either way (results/callbacks.py; tests/test_failures.py, tests/test_noise.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import NoReturn

from unified_train import config as C
from unified_train import rundir
from unified_train.runtime import ranks


class JobFailed(RuntimeError):
    """A job's failure, as an exception Hydra's launcher records for that job."""


@contextlib.contextmanager
def recorded(job: rundir.JobIdentity, new_attempt: bool = True):
    """Record any failure of the body into the job's run directory, then let it go on. `new_attempt`: the body is
    a new attempt in the directory (a restart or requeue), so an earlier attempt's record is dropped first; a
    spawned rank of the job is not (its parent already started the attempt)."""
    if new_attempt and job.run_dir is not None:
        rundir.clear_failure(job.run_dir)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):  # the stacks' clean stops exit 0
            raise
        failure = rundir.failure_record(exc, rank=ranks.rank())
        record(job, failure)
        if new_attempt and job.multirun and isinstance(exc, SystemExit) and not os.environ.get(C.SUBMITIT_JOB_VARIABLE):
            said = f": {failure['message']}" if failure["message"] else ""
            raise JobFailed(f"the job exited with status {failure['exit_code']}{said}") from exc
        raise


def record(job: rundir.JobIdentity, failure: dict) -> None:
    """failure.json, and run.json where the job failed before writing it, so the comparison finds the job and
    pairs it by its pair id."""
    if job.run_dir is None:  # parity and export have no run directory
        return
    if not os.path.isfile(os.path.join(job.run_dir, rundir.RUN_JSON)):
        rundir.write_identity(job)
    rundir.record_failure(job.run_dir, failure)


def fail(job: rundir.JobIdentity, message: str, exit_code: int) -> NoReturn:
    """End a job of a multirun that cannot go on (`message` says why): recorded, then raised as `JobFailed`."""
    exc = JobFailed(message)
    record(job, rundir.failure_record(exc, rank=ranks.rank(), exit_code=exit_code))
    raise exc
