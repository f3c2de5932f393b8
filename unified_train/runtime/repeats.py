"""compare.repeats: the noise floor. After its main run, a training job trains N more times with the identical config,
each into its own run directory <run dir>/repeats/<k>/ (rundir.repeat_dir), in this process or isolated as
launch.isolation says. results/compare.py reads each backend's run-to-run spread from them (rundir.read_repeats).

A repeat saves no checkpoint and starts no W&B run, so it cannot collide with the main run's; neither changes what
is trained (both are outside the pair id), and the repeat's own unified_config.yaml records them.
"""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from unified_train import rundir
from unified_train.runtime import failures


def repeat_config(cfg, run_dir: str):
    """The job's config for one repeat: the same training, no checkpoint, no W&B run, no repeats of its own."""
    return OmegaConf.merge(
        cfg,
        {
            "checkpoint": {"save": False},
            "logger": {"wandb": {"enabled": False}},
            "compare": {"repeats": 0},
            "run_dir": run_dir,
        },
    )


def run(cfg, job: rundir.JobIdentity, run_one) -> None:
    """Repeat the job `cfg.compare.repeats` times through `run_one(cfg, job)` (runtime.job.run). A run stopped by
    its exit signal is not repeated (the scheduler wants the job gone). A repeat that fails records its failure in
    its directory and fails the job."""
    count = OmegaConf.select(cfg, "compare.repeats", default=0)
    if not count or job.run_dir is None:
        return
    summary = rundir.read_summary(job.run_dir)
    if summary is not None and summary.get("stopped_by"):
        return
    for k in range(1, count + 1):
        repeat = dataclasses.replace(job, run_dir=rundir.repeat_dir(job.run_dir, k))
        try:
            with failures.recorded(repeat):
                run_one(repeat_config(cfg, repeat.run_dir), repeat)
        except Exception as exc:
            raise failures.JobFailed(
                f"repeat {k} of {count} failed ({type(exc).__name__}: {exc}); its record: {repeat.run_dir}"
            ) from exc
