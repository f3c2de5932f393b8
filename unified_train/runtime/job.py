"""Run one training job: in this process, in a fresh worker process, or as several ranks started from the config.

Each way ends in `run_job` on every rank: environment, world process group, native config, train, teardown.
"""

from __future__ import annotations

import gc
import os

from omegaconf import OmegaConf

from unified_train import backends, resume, rundir
from unified_train import config as C
from unified_train.results import metrics, wandb_runs
from unified_train.runtime import env, failures, preemption, ranks, repeats


def run(cfg, job: rundir.JobIdentity, task_started: float | None = None) -> None:
    """Start the job the way its identity and config ask for."""
    if job.world_size > 1 and not ranks.launched_as_rank():
        ranks.spawn(cfg, job.world_size, _rank_entry, job.handover())
    elif cfg.launch.isolation == "process":
        _run_in_fresh_process(cfg, job)
    else:
        run_job(cfg, job, task_started)
    repeats.run(cfg, job, run)  # compare.repeats: the same training again, into repeats/<k>/ (runtime/repeats.py)


def run_job(cfg, job: rundir.JobIdentity, task_started: float | None = None) -> dict:
    """One training job in this process: env, process group, translate, train, teardown. `task_started`: when
    Hydra handed this job over (for the start-up phases in summary.json)."""
    job_started = metrics.process_seconds()
    os.environ.update(env.process_env(cfg))
    env.pin_compiler_determinism()
    # Joining the world group waits for every rank, so every rank has checked the run directory (app.run)
    # before any rank writes into it.
    ranks.init_process_group(job.world_size)
    wandb_runs.apply_env(wandb_runs.wandb_env(cfg, job))
    os.makedirs(job.run_dir, exist_ok=True)
    rank = ranks.rank()
    writes_metrics = rank == job.world_size - 1
    start = resume.start(cfg, job.run_dir)
    resumed = {"resumed_from": start.iteration_to_load(), "resumed_own": start.own} if start.resumes else {}
    if start.own and writes_metrics:  # a restarted run: its metrics continue where its checkpoint left off
        rundir.archive_attempt(job.run_dir, resumed["resumed_from"])
    exit_signal = preemption.ExitSignal(C.exit_signal(cfg))  # before the stack replaces the handler there

    def training_started(unified: dict) -> None:  # the stack is set up: its W&B run and its signal handler exist
        wandb_runs.add_unified_config(unified)
        exit_signal.watch()

    sink = metrics.MetricsSink(
        job.run_dir,
        backend=job.backend,
        world_size=job.world_size,
        write=writes_metrics,
        continued=start.own,
        tokens_per_iteration=cfg.train.global_batch_size * cfg.train.seq_length,
        on_training_started=training_started,
        unified_config=OmegaConf.to_container(cfg, resolve=True),
    )
    if task_started is not None:
        sink.mark("hydra_task_started", at=task_started)
    sink.mark("job_started", at=job_started)
    backend = backends.get(job.backend)
    native = backend.native_config(cfg, job)
    sink.mark("native_config_built")  # includes importing the stack
    if rank == 0:
        rundir.write_job_record(cfg, job)
        native_dir = job.subdir(rundir.NATIVE_DIR)
        os.makedirs(native_dir, exist_ok=True)
        backend.write_native(native, native_dir)
    sink.mark("pretrain_called")
    if rank == 0:
        print(metrics.pretrain_called_line("unified_train", sink.startup), flush=True)
    # What is alive now (the imported stacks, Hydra, the configs) lives as long as the job. Frozen, it is left out
    # of the collector's full passes: unfrozen, one landed in iteration 1 of MLM jobs (0.6-0.9 s on an H200 node),
    # while megatron-core's fused kernels are compiled there (docs/measurements.md).
    gc.freeze()
    try:
        backend.train(native, sink)
    finally:
        backend.teardown()
        wandb_runs.end_run()
        gc.unfreeze()
    stopped = {"stopped_by": exit_signal.signum.name} if exit_signal.received else {}
    summary = sink.close(pair_id=job.pair_id, **resumed, **stopped)
    exit_signal.hand_over()  # in a submitit job: requeued (and this process ends) here
    return summary


def _rank_entry(cfg_yaml: str, identity: dict) -> None:
    """One spawned rank (or isolated worker): a fresh interpreter whose DataLoader workers start as under torchrun."""
    ranks.as_fresh_interpreter()
    job = rundir.JobIdentity(**identity)
    with failures.recorded(job, new_attempt=False):  # the rank's own traceback: its parent sees only an exit code
        run_job(OmegaConf.create(cfg_yaml), job)


def _run_in_fresh_process(cfg, job: rundir.JobIdentity) -> None:
    """Process isolation: the job runs in a spawned interpreter that exits afterwards (long runs, leaks)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=ranks.spawned, args=(_rank_entry, OmegaConf.to_yaml(cfg, resolve=True), job.handover()))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"job in {job.run_dir} failed in its worker process (exit code {proc.exitcode})")
