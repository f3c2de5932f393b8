"""hydra/launcher=slurm on the submitting host: the checks and the sbatch preview, before anything is submitted.

The launcher itself is hydra-submitit-launcher's (conf/hydra/launcher/slurm.yaml): every sweep point becomes one
element of a Slurm job array and every Slurm task is one rank. Inside the job, `runtime.ranks.adopt_slurm_ranks` turns
the Slurm environment into torch's rank variables.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from unified_train import resources

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def is_slurm(launcher: dict | None) -> bool:
    return bool(launcher) and launcher.get("_target_") == SLURM_LAUNCHER


NEEDS_GPUS_PER_NODE = (
    "parallel.gpus_per_node is unset: hydra/launcher=slurm starts one rank per GPU on each of "
    "parallel.nnodes nodes; set parallel.gpus_per_node (e.g. parallel.gpus_per_node=8)"
)


def check(cfg, launcher: dict) -> list[str]:
    """The job's world size must be the Slurm job's task count (nodes x tasks per node)."""
    if cfg.parallel.gpus_per_node is None:
        return [NEEDS_GPUS_PER_NODE]
    tasks = launcher["nodes"] * launcher["tasks_per_node"]
    world = resources.world_size(cfg)
    if world != tasks:
        return [
            f"parallel.tp*pp*cp*dp = {world} ranks but the Slurm job has {launcher['nodes']} node(s) x "
            f"{launcher['tasks_per_node']} tasks = {tasks}: set parallel.dp=null (all GPUs) or match "
            "parallel.nnodes/parallel.gpus_per_node"
        ]
    return []


def sbatch_preview(launcher: dict, num_jobs: int) -> str:
    """The sbatch script submitit would submit for `num_jobs` sweep points (one array), made by submitit's own
    generator from the launcher's parameters, the way hydra-submitit-launcher passes them on."""
    from submitit.slurm import slurm

    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    rename = slurm.SlurmExecutor._equivalence_dict()
    native = {rename.get(k, k): v for k, v in params.items() if v is not None}
    if "mem" in native:
        native["mem"] = slurm._convert_mem(native["mem"])
    folder = str(Path(launcher["submitit_folder"]).expanduser().absolute())  # as submitit's executor holds it
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return slurm._make_sbatch_string(
        command=command, folder=folder, map_count=num_jobs if num_jobs > 1 else None, **native
    )
