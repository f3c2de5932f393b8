"""Run one job: in this process, in a fresh worker process, or as several ranks started from the config.

The process environment and the world process group are owned here, identically for both backends, so a
Bridge job and an MLM job see the same NCCL/cuBLAS settings and a pair run in one process matches two
separate processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from unittest import mock

from omegaconf import OmegaConf

from unified_train import plan, ranks

# Set for every job (and every spawned rank) before the first CUDA/NCCL use.
BASE_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # required for TP/CP comm ordering on Hopper
    "NCCL_NVLS_ENABLE": "0",  # NVLink multicast is not available on the lent nodes
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    # megatron-core's fused kernels are torch.compile'd. Inductor otherwise picks reduction kernels by timing
    # them (and caches the pick on disk for later processes), and dynamo reuses dynamic-shape profiles that
    # earlier processes left on disk; either changes the rounding from one process to the next. These make
    # compiled numerics a function of the code alone (with _pin_compiler_determinism, which keeps the first
    # in force for every compile).
    "TORCHINDUCTOR_DETERMINISTIC": "1",
    "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO": "0",
    # Every process compiles for itself, so no graph compiled by an earlier process (under other settings,
    # perhaps by another tool) is reused. These caches were switched off when an H100 run's numerics followed
    # what ran on the node before. The timing-based picks above most likely caused that; whether the caches are
    # safe with the picks pinned is not measured.
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
}
DETERMINISTIC_ENV = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def process_env(cfg) -> dict[str, str]:
    env = dict(BASE_ENV)
    if cfg.determinism.deterministic_mode:
        env.update(DETERMINISTIC_ENV)
    return env


@contextlib.contextmanager
def job_environment(cfg):
    """The job's process environment, for work that builds native configs outside a job (parity, export):
    Bridge's validation reads NCCL_ALGO under determinism and switches deterministic algorithms on globally."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    with mock.patch.dict(os.environ, process_env(cfg)):
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)


def run(cfg) -> None:
    """Entry from Hydra: dispatch on `mode`."""
    from unified_train import tracking

    task_started = tracking.process_seconds()
    os.environ.update(process_env(cfg))  # before torch is imported: some settings are read at import
    os.environ["UNIFIED_TRAIN_SWEEP_ID"] = sweep_id()  # for spawned ranks and workers
    ranks.adopt_slurm_ranks()  # before any native config is built: MLM reads RANK/WORLD_SIZE while parsing
    if cfg.mode == "parity":
        from unified_train import parity

        return _finish(parity.main(cfg))
    if cfg.mode == "export":
        from unified_train import export

        print(export.render(cfg))
        return
    run_dir = cfg.run_dir or _hydra_output_dir()
    problem = plan.check_run_dir(run_dir, plan.output_dir_key(cfg, multirun=sweep_id() != "single"))
    if problem:
        print(f"unified_train: {problem}", file=sys.stderr)
        sys.exit(2)
    if cfg.mode == "preflight":
        from unified_train import preflight

        return _finish(preflight.run(cfg, run_dir))
    if not _cuda_available():
        print("unified_train: no CUDA GPU is visible: training needs one (mode=parity and mode=export run on CPU)",
              file=sys.stderr)
        sys.exit(2)
    world = plan.world_size(cfg)
    if world > 1 and "RANK" not in os.environ:
        ranks.spawn(cfg, run_dir, world)
    elif cfg.launch.isolation == "process":
        _run_in_fresh_process(cfg, run_dir)
    else:
        run_job(cfg, run_dir, task_started)


def _finish(status: int) -> None:
    """A failed check ends a single run with its exit status; in a multirun the job fails and the sweep goes on
    (Hydra's launcher records the exception), so every point gets checked."""
    if status == 0:
        return
    if sweep_id() == "single":
        sys.exit(status)
    raise RuntimeError(f"job failed its check (status {status})")


def sweep_id() -> str:
    """The multirun's sweep directory name (tags the W&B runs of one sweep), or 'single'."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return os.path.basename(hc.sweep.dir.rstrip("/")) if hc.mode == RunMode.MULTIRUN else "single"
    except ValueError:  # no Hydra context (a spawned worker): the caller passes it on
        return os.environ.get("UNIFIED_TRAIN_SWEEP_ID", "single")


def _hydra_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def init_process_group(world_size: int) -> None:
    """Own the world process group (one per process, kept across jobs) so neither stack destroys it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(ranks.free_port()))
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))


def write_run_json(cfg, run_dir: str) -> None:
    """The resolved unified config and the job's identity (pair id, backend, mode): what compare.py reads."""
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "unified_config.yaml"), resolve=True)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"backend": cfg.backend.name, "mode": cfg.mode, "pair_id": plan.pair_id(cfg),
                   "tp_group": plan.tp_group_id(cfg), "model": cfg.model.name,
                   "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "world_size": plan.world_size(cfg)}, f, indent=2)


def write_run_files(cfg, run_dir: str, native, backend) -> None:
    """run.json and the unified config, plus the native config next to the metrics."""
    write_run_json(cfg, run_dir)
    os.makedirs(os.path.join(run_dir, "native"), exist_ok=True)
    backend.write_native(native, os.path.join(run_dir, "native"))


def run_job(cfg, run_dir: str, task_started: float | None = None) -> dict:
    """One training job in this process: env, process group, translate, train, teardown. `task_started`: when
    Hydra handed this job over (for the start-up phases in summary.json)."""
    from unified_train import backends, tracking

    job_started = tracking.process_seconds()
    os.environ.update(process_env(cfg))
    _pin_compiler_determinism()
    world = plan.world_size(cfg)
    # Joining the world group waits for every rank, so every rank has checked the run directory (launch.run)
    # before any rank writes into it.
    init_process_group(world)
    wandb_env = tracking.wandb_env(cfg, run_dir, sweep_id())
    if wandb_env["WANDB_DIR"]:
        os.makedirs(wandb_env["WANDB_DIR"], exist_ok=True)  # wandb falls back to a temp dir if it is missing
    tracking.apply_env(wandb_env)
    os.makedirs(run_dir, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    sink = tracking.MetricsSink(run_dir, backend=cfg.backend.name, world_size=world, write=rank == world - 1,
                                tokens_per_iteration=cfg.train.global_batch_size * cfg.train.seq_length,
                                unified_config=OmegaConf.to_container(cfg, resolve=True))
    if task_started is not None:
        sink.mark("hydra_task_started", at=task_started)
    sink.mark("job_started", at=job_started)
    backend = backends.get(cfg.backend.name)
    native = backend.native_config(cfg, run_dir, world_size=world)
    sink.mark("native_config_built")  # includes importing the stack
    if rank == 0:
        write_run_files(cfg, run_dir, native, backend)
    sink.mark("pretrain_called")
    if rank == 0:
        print(tracking.pretrain_called_line("unified_train", sink.startup), flush=True)
    # What is alive now (the imported stacks, Hydra, the configs) lives as long as the job. Frozen, it is left out
    # of the collector's full passes: unfrozen, one landed in iteration 1 of MLM jobs (0.6-0.9 s on an H200 node),
    # while megatron-core's fused kernels are compiled there.
    gc.freeze()
    try:
        backend.train(native, sink)
    finally:
        backend.teardown()
        tracking.end_wandb_run()
        gc.unfreeze()
    return sink.close(pair_id=plan.pair_id(cfg))


def _pin_compiler_determinism() -> None:
    """The compiler settings of BASE_ENV, for when torch's compiler configs were imported before the environment
    was set, and kept in force for every compile of the process."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    _keep_inductor_deterministic()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.automatic_dynamic_local_pgo = False
    # torch 2.11's dynamo ends every frame it compiles with torch.use_deterministic_algorithms(<eager flag>), and
    # that call also sets inductor's `deterministic` (to False, as eager determinism is off). Every later compile,
    # and every backward (compiled lazily, at the first backward call), would then choose its reduction kernels
    # by timing them, and cache the winner on disk for later processes: the iteration-1 numerics depended on
    # the node's timing noise and on what ran there before. So the setting is restored as each compile starts.
    handler = torch._dynamo.callback_handler
    if _keep_inductor_deterministic not in handler.start_callbacks:
        handler.register_start_callback(_keep_inductor_deterministic)


def _keep_inductor_deterministic(_args=None) -> None:
    import torch._inductor.config

    torch._inductor.config.deterministic = True


def as_fresh_interpreter() -> None:
    """A spawned child inherits the parent's `spawn` start method; give it the platform default back, as a fresh
    interpreter has. The stacks' DataLoader workers need it: MLM's worker_init_fn is a local function, which the
    spawn method cannot pickle."""
    import multiprocessing as mp

    mp.set_start_method(None, force=True)


def _worker(cfg_yaml: str, run_dir: str) -> None:
    as_fresh_interpreter()
    run_job(OmegaConf.create(cfg_yaml), run_dir)


def _run_in_fresh_process(cfg, run_dir: str) -> None:
    """Process isolation: the job runs in a spawned interpreter that exits afterwards (long runs, leaks)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_worker, args=(OmegaConf.to_yaml(cfg, resolve=True), run_dir))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"job in {run_dir} failed in its worker process (exit code {proc.exitcode})")
