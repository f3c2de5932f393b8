"""A job's ranks: started from the composed config with torch's elastic launch API (no torchrun), or adopted
from an existing launcher. torchrun sets the rank variables itself; inside a Slurm job step every task is one
rank whose variables `adopt_slurm_ranks` derives from the Slurm environment. Also the world process group, and
the rendezvous probe `mode=preflight` runs on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket

from unified_train import rundir
from unified_train.runtime import env

# torch's env:// rendezvous variables, as launchers (torchrun, submitit) export them.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (rendezvous / MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched_as_rank() -> bool:
    """A launcher (torchrun, Slurm, or spawn below) started this process as one rank of its job."""
    return "RANK" in os.environ


def adopt_slurm_ranks() -> bool:
    """Inside a Slurm job step of several tasks (srun, or hydra/launcher=slurm through submitit), export torch's
    env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the Slurm environment.

    Called before any native config is built: MLM reads RANK and WORLD_SIZE when it parses its arguments.
    CUDA_VISIBLE_DEVICES is left whole, because both stacks select `cuda:LOCAL_RANK` themselves; narrowed to one
    device, every rank but local rank 0 would fail. A batch script's own process (no step of several tasks) is
    left alone: it is one process, not a rank of a larger world.
    """
    if launched_as_rank():  # torchrun, or a launcher that already did this
        return False
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
        return False
    from unittest import mock

    from submitit.helpers import TorchDistributedEnvironment

    # submitit recognises a Slurm task by the variable its own batch scripts set; a plain srun step is one too.
    with mock.patch.dict(os.environ, {"SUBMITIT_EXECUTOR": "slurm"}):
        distributed = TorchDistributedEnvironment()
    distributed.export(set_cuda_visible_devices=False)
    return True


def spawn(cfg, world_size: int, entry, *args) -> None:
    """Run `entry(cfg_yaml, *args)` on `world_size` local ranks, each a fresh interpreter."""
    from omegaconf import OmegaConf
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if cfg.parallel.nnodes != 1:
        raise SystemExit(
            "unified_train: parallel.nnodes > 1 needs one launcher per node; "
            "use a multi-node launcher (Slurm) or torchrun on every node"
        )
    port = free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"unified_train_{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    elastic_launch(config, spawned)(entry, OmegaConf.to_yaml(cfg, resolve=True), *args)


def spawned(entry, *args) -> None:
    """A spawned interpreter's entry, `entry(*args)`, logging as the Hydra job does (conf/hydra/job_logging): to
    stderr, so stdout carries only results. Without a handler of ours, importing megatron.training installs one that
    writes every INFO record to stdout, and Bridge's import_utils logs through its own stderr handler and the root."""
    import logging
    import sys

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    logging.getLogger("megatron.bridge.utils.import_utils").propagate = False
    entry(*args)


def as_fresh_interpreter() -> None:
    """A spawned child inherits the parent's `spawn` start method; give it the platform default back, as a fresh
    interpreter has. The stacks' DataLoader workers need it: MLM's worker_init_fn is a local function, which the
    spawn method cannot pickle (tests/test_ranks.py)."""
    import multiprocessing as mp

    mp.set_start_method(None, force=True)


def init_process_group(world_size: int) -> None:
    """Own the world process group (one per process, kept across jobs) so neither stack destroys it; this process
    destroys it when it ends (else torch warns that destroy_process_group() was not called)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        "nccl",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])),
    )
    atexit.register(_destroy_world_group)


def _destroy_world_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_rank():
    """The rank variables of a one-rank group in this process, restored afterwards."""
    saved = {k: os.environ.get(k) for k in RANK_VARIABLES}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rendezvous_probe(cfg_yaml: str, run_dir: str, extra: dict | None = None) -> None:
    """Join the world group (NCCL with GPUs, gloo without), all-reduce, and write this rank's report into the
    run directory, with the process settings it runs under (NVLink multicast off, CUDA connections, compiler
    determinism)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    this_rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([this_rank + 1.0], device="cuda" if cuda else "cpu")
    dist.all_reduce(value)
    report = {
        "rank": this_rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "all_reduce_ok": value.item() == world * (world + 1) / 2,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "process_env": {key: os.environ.get(key) for key in env.BASE_ENV},
        **(extra or {}),
    }
    rundir.write_rank_report(run_dir, this_rank, report)
    dist.barrier()  # every report is on disk before any rank sums them up
    dist.destroy_process_group()
