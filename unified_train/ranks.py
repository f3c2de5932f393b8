"""Start a multi-GPU job's ranks from the composed config, with torch's elastic launch API (no torchrun).

Each rank runs the same in-process job (`launch.run_job`). Under an existing launcher (torchrun, Slurm) the
rank environment is already there and `launch.run` never comes here.
"""

from __future__ import annotations

import json
import os
import socket

from omegaconf import OmegaConf


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (rendezvous / MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    launch.run_job(OmegaConf.create(cfg_yaml), run_dir)


def rendezvous_probe(cfg_yaml: str, run_dir: str, extra: dict | None = None) -> None:
    """Join the world group (NCCL with GPUs, gloo without), all-reduce, and write `rank_<r>.json`."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([rank + 1.0], device="cuda" if cuda else "cpu")
    dist.all_reduce(value)
    report = {"rank": rank, "world_size": world, "local_rank": int(os.environ["LOCAL_RANK"]),
              "host": socket.gethostname(), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "all_reduce_ok": value.item() == world * (world + 1) / 2, **(extra or {})}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
