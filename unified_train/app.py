"""Mode dispatch: Hydra hands each job's config here. The job's identity (world size, pair id, sweep, run
directory) is computed once, here, and handed down; nothing imports this module."""

from __future__ import annotations

import os
import sys

from unified_train import resources, rundir
from unified_train.results.metrics import process_seconds
from unified_train.runtime import env, ranks


def run(cfg) -> None:
    task_started = process_seconds()
    os.environ.update(env.process_env(cfg))  # before torch is imported: some settings are read at import
    ranks.adopt_slurm_ranks()  # before the world size is read: MLM reads RANK/WORLD_SIZE while parsing
    builds_only = cfg.mode in ("parity", "export")  # native configs, no run directory of Hydra's
    run_dir = cfg.run_dir if builds_only else cfg.run_dir or _hydra_output_dir()
    job = rundir.identity(cfg, world_size=resources.world_size(cfg), sweep_id=_sweep_id(), run_dir=run_dir)
    if builds_only:
        if cfg.mode == "parity":
            from unified_train.modes import parity

            return _finish(parity.main(cfg, job), job)
        from unified_train.modes import export

        print(export.render(cfg, job))
        return
    problem = rundir.check_run_dir(job.run_dir, rundir.output_dir_key(cfg, multirun=job.multirun))
    if problem:
        _refuse(problem)
    if cfg.mode == "preflight":
        from unified_train.modes import preflight

        return _finish(preflight.run(cfg, job), job)
    if not _cuda_available():
        _refuse("no CUDA GPU is visible: training needs one (mode=parity and mode=export run on CPU)")
    from unified_train.runtime import job as training_job

    training_job.run(cfg, job, task_started)


def _refuse(problem: str) -> None:
    print(f"unified_train: {problem}", file=sys.stderr)
    sys.exit(2)


def _finish(status: int, job: rundir.JobIdentity) -> None:
    """A failed check ends a single run with its exit status; in a multirun the job fails and the sweep goes on
    (Hydra's launcher records the exception), so every point gets checked."""
    if status == 0:
        return
    if not job.multirun:
        sys.exit(status)
    raise RuntimeError(f"job failed its check (status {status})")


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
