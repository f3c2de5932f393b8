"""Start a multi-GPU job's ranks from the composed config, with torch's elastic launch API (no torchrun).

Each rank runs the same in-process job (`launch.run_job`). Under an existing launcher the ranks exist already:
torchrun sets the rank variables itself, and inside a Slurm job step every task is one rank whose variables
`adopt_slurm_ranks` derives from the Slurm environment.
"""

from __future__ import annotations

import json
import os
import socket

from omegaconf import OmegaConf


# torch's env:// rendezvous variables, as launchers (torchrun, submitit) export them.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (rendezvous / MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_of_several_ranks() -> bool:
    """This process is one rank of a job whose other ranks run the same command at the same moment: under
    torchrun, or in a Slurm job step of several tasks (srun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def adopt_slurm_ranks() -> bool:
    """Inside a Slurm job step of several tasks (srun, or hydra/launcher=slurm through submitit), export torch's
    env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the Slurm environment.

    Called before any native config is built: MLM reads RANK and WORLD_SIZE when it parses its arguments.
    CUDA_VISIBLE_DEVICES is left whole, because both stacks select `cuda:LOCAL_RANK` themselves; narrowed to one
    device, every rank but local rank 0 would fail. A batch script's own process (no step of several tasks) is
    left alone: it is one process, not a rank of a larger world.
    """
    if "RANK" in os.environ:  # torchrun, or a launcher that already did this
        return False
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
        return False
    from unittest import mock

    from submitit.helpers import TorchDistributedEnvironment

    # submitit recognises a Slurm task by the variable its own batch scripts set; a plain srun step is one too.
    with mock.patch.dict(os.environ, {"SUBMITIT_EXECUTOR": "slurm"}):
        env = TorchDistributedEnvironment()
    env.export(set_cuda_visible_devices=False)
    return True


def spawn(cfg, run_dir: str, world_size: int, entry=None) -> None:
    """Run `entry(cfg_yaml, run_dir)` (default: the training job) on `world_size` local ranks."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if cfg.parallel.nnodes != 1:
        raise SystemExit("unified_train: parallel.nnodes > 1 needs one launcher per node; "
                         "use a multi-node launcher (Slurm) or torchrun on every node")
    port = free_port()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"unified_train_{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    elastic_launch(config, entry or _train_rank)(OmegaConf.to_yaml(cfg, resolve=True), run_dir)


def _train_rank(cfg_yaml: str, run_dir: str) -> None:
    from unified_train import launch

    launch.as_fresh_interpreter()  # a spawned rank; its DataLoader workers start as under torchrun
    launch.run_job(OmegaConf.create(cfg_yaml), run_dir)


def rendezvous_probe(cfg_yaml: str, run_dir: str, extra: dict | None = None) -> None:
    """Join the world group (NCCL with GPUs, gloo without), all-reduce, and write `rank_<r>.json`, with the
    process settings this rank runs under (NVLink multicast off, CUDA connections, compiler determinism)."""
    import torch
    import torch.distributed as dist

    from unified_train import launch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([rank + 1.0], device="cuda" if cuda else "cpu")
    dist.all_reduce(value)
    report = {"rank": rank, "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
              "host": socket.gethostname(), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "all_reduce_ok": value.item() == world * (world + 1) / 2,
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "process_env": {key: os.environ.get(key) for key in launch.BASE_ENV}, **(extra or {})}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()  # every report is on disk before any rank sums them up
    dist.destroy_process_group()
