"""Where a training job starts from: `checkpoint.resume` (never | if_available | always) and `checkpoint.load`.

One decision (`start`) read from the file system the same way on every rank, before anything is written: the job's
own checkpoints when it is started again in its own run directory (a Slurm requeue) and the policy allows it, else
`checkpoint.load` (at `checkpoint.load_iteration`, or the latest), else nothing. `guard` is the run-directory check
with the policy applied: a directory holding an earlier run is refused unless it is this job's own, written by the
same config. Light floor: no torch or megatron.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from unified_train import rundir

# Keys a restarted job may change without becoming another run: how it logs, launches and resumes, and what the
# comparison does afterwards.
_NOT_THE_RUN = ("logger", "launch", "compare", "checkpoint.resume", "hydra")


@dataclass(frozen=True)
class Start:
    """What the job loads: a checkpoints directory and an iteration (None: the latest there), or nothing."""

    checkpoints: str | None = None
    iteration: int | None = None
    own: bool = False  # continuing this run directory's own checkpoints

    @property
    def resumes(self) -> bool:
        return self.checkpoints is not None

    def iteration_to_load(self) -> int | None:
        """The iteration the stacks will load: the asked one, or the tracker's latest."""
        if self.checkpoints is None:
            return None
        return self.iteration if self.iteration is not None else rundir.latest_iteration(self.checkpoints)


def own_checkpoints(run_dir: str | None) -> str | None:
    if run_dir is None:
        return None
    directory = os.path.join(run_dir, rundir.CHECKPOINTS)
    return directory if rundir.latest_iteration(directory) is not None else None


def start(cfg, run_dir: str | None) -> Start:
    own = own_checkpoints(run_dir) if cfg.checkpoint.resume != "never" else None
    if own is not None:
        return Start(own, None, own=True)
    if cfg.checkpoint.load:
        checkpoints, iteration = rundir.split_checkpoint_path(cfg.checkpoint.load)
        return Start(checkpoints, iteration if iteration is not None else cfg.checkpoint.load_iteration)
    return Start()


def differing_keys(stored, cfg) -> list[str]:
    """The dotted keys whose values differ between a run directory's stored unified config and `cfg`."""
    a, b = _flat(OmegaConf.to_container(stored, resolve=True)), _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in keys if not any(k == n or k.startswith(n + ".") for n in _NOT_THE_RUN)]


def guard(cfg, run_dir: str, key: str, started: bool = True) -> str | None:
    """The run-directory check under the resume policy (None: the job may start there). `run_dir` is a job's
    directory, or a sweep's (then each job checks its own when it starts)."""
    policy = cfg.checkpoint.resume
    if policy == "never":
        return rundir.check_run_dir(run_dir, key, started)
    leftovers = rundir.check_run_dir(run_dir, key, started, fix=f"choose a new {key}: it holds no unified_train run")
    if leftovers and os.path.exists(os.path.join(run_dir, rundir.HYDRA_SWEEP_RECORD)):  # each job guards its own
        return None
    if leftovers and os.path.exists(os.path.join(run_dir, rundir.UNIFIED_CONFIG)):
        changed = differing_keys(rundir.read_unified_config(run_dir), cfg)
        if changed:
            return (
                f"checkpoint.resume={policy}: {run_dir} holds a run of another config (differs in "
                f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}): choose a new {key} or the same config"
            )
        leftovers = None  # this job's own earlier attempt
    if leftovers:
        return leftovers
    if policy == "always" and not start(cfg, run_dir).resumes:
        return (
            f"checkpoint.resume=always: no checkpoint in {os.path.join(run_dir, rundir.CHECKPOINTS)} and "
            "checkpoint.load unset: give checkpoint.load=DIR or checkpoint.resume=if_available"
        )
    return None


def finished(cfg, run_dir: str) -> bool:
    """The run directory already holds this run, trained to the end: a restart has nothing left to do."""
    own = own_checkpoints(run_dir) if cfg.checkpoint.resume != "never" else None
    return (
        own is not None
        and rundir.latest_iteration(own) >= cfg.train.iters
        and os.path.exists(os.path.join(run_dir, rundir.SUMMARY))
    )


def _flat(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
