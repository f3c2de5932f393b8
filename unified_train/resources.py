"""World size, visible GPUs and the weights + optimizer memory estimate, without importing torch."""

from __future__ import annotations

import functools
import os
import re

from unified_train import config as C


def hardware_gpus() -> int:
    """NVIDIA GPUs this host has, from the driver, never from environment variables: the driver's
    /proc/driver/nvidia/gpus (a container sees its own GPUs there), else the /dev/nvidia<N> device nodes, else
    nvidia-smi's list (one line per GPU; none where it is missing or finds no driver)."""
    for directory, pattern in (("/proc/driver/nvidia/gpus", None), ("/dev", re.compile(r"nvidia\d+"))):
        try:
            found = [n for n in os.listdir(directory) if pattern is None or pattern.fullmatch(n)]
        except OSError:
            found = []
        if found:
            return len(found)
    return len(_smi_gpus_mib() or [])


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch: the host's, narrowed (never widened) by
    CUDA_VISIBLE_DEVICES."""
    gpus = hardware_gpus()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = min(gpus, len([d for d in env.split(",") if d.strip() and d.strip() != "-1"]))
    return gpus


def under_launcher() -> bool:
    """A launcher started this process as one rank of its job (torchrun; an srun step of several tasks)."""
    return "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def model_parallel_size(cfg) -> int:
    p = cfg.parallel
    return p.tp * p.pp * p.cp


def world_size(cfg) -> int:
    """tp * pp * cp * dp. dp defaults to every GPU left over (all nodes), or the launcher's WORLD_SIZE. Read once
    per job, into its identity (rundir.identity): spawned ranks export WORLD_SIZE afterwards."""
    mp = model_parallel_size(cfg)
    if cfg.parallel.dp is not None:
        return mp * cfg.parallel.dp
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    gpus = (cfg.parallel.gpus_per_node or visible_gpus()) * cfg.parallel.nnodes
    return mp * max(1, gpus // mp)


def data_parallel_size(cfg) -> int:
    return world_size(cfg) // model_parallel_size(cfg)


def param_count(cfg) -> int:
    """Parameters of the model (dense, MoE and learned-position parts; MLA counted as multi-head attention)."""
    m = cfg.model
    h, layers = m.hidden_size, m.num_layers
    heads = m.num_attention_heads
    head_dim = m.kv_channels or h // heads
    groups = m.num_query_groups or heads
    attention = h * head_dim * (heads + 2 * groups) + heads * head_dim * h
    gate = 2 if m.activation == "swiglu" else 1
    ffn = C.ffn_hidden_size(cfg)
    dense_mlp = (gate + 1) * h * ffn
    mlp = [dense_mlp] * layers
    if m.num_experts is not None:
        expert = (gate + 1) * h * (m.moe_ffn_hidden_size or ffn)
        shared = (gate + 1) * h * (m.moe_shared_expert_intermediate_size or 0)
        moe = m.num_experts * expert + shared + h * m.num_experts
        mlp = [dense_mlp] * m.moe_first_dense_layers + [moe] * (layers - m.moe_first_dense_layers)
    embeddings = m.vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    if m.position_embedding_type == "learned_absolute":
        embeddings += C.position_table_size(cfg) * h
    return embeddings + layers * (attention + 4 * h) + sum(mlp)


def memory_gib_per_gpu(cfg) -> float:
    """Weights, gradients and optimizer state per GPU (activations excluded): bf16 weights, fp32 gradients,
    fp32 master weights and two Adam moments, the last three sharded over data parallelism with the
    distributed optimizer."""
    p = cfg.parallel
    params = param_count(cfg) / (p.tp * p.pp)
    weight_bytes = 2 if cfg.precision.dtype in ("bf16", "fp16") else 4
    state = 4 + 8 + (4 if weight_bytes == 2 else 0)
    dp = data_parallel_size(cfg) if cfg.optim.use_distributed_optimizer else 1
    return params * (weight_bytes + 4 + state / dp) / 2**30


@functools.cache
def query_gpu_memory():
    """Start nvidia-smi for every GPU's memory, once per process and in the background: bringing the driver up can
    take it seconds, which then overlap with composing the jobs. None where there is no nvidia-smi."""
    import subprocess

    try:
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        return None


@functools.cache
def _smi_gpus_mib() -> list[float] | None:
    """nvidia-smi's answer, one memory size (MiB) per GPU, or None when it cannot be read."""
    import subprocess

    proc = query_gpu_memory()
    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=10)
        return [float(line) for line in out.split()] if proc.returncode == 0 else None
    except (ValueError, subprocess.TimeoutExpired):
        proc.kill()
        return None


def gpu_memory_gib() -> float | None:
    """Memory of the first GPU in GiB, from nvidia-smi (no torch), or None when it cannot be read."""
    sizes = _smi_gpus_mib()
    return sizes[0] / 1024 if sizes else None


def check(cfg) -> list[str]:
    """For a training job that runs on this host: GPUs the hardware has (whatever the environment or
    parallel.gpus_per_node say), enough of them, and weights + optimizer state that fit them. Under
    hydra/launcher=slurm the job runs on other hosts: slurm.check instead."""
    if cfg.mode not in C.TRAINING_MODES:
        return []
    p, here, need = cfg.parallel, visible_gpus(), world_size(cfg)
    if here == 0:
        return [
            f"mode={cfg.mode}: no GPU is visible: training needs {need} and this host's NVIDIA driver reports none "
            "(whatever CUDA_VISIBLE_DEVICES, WORLD_SIZE or parallel.gpus_per_node say): run it on a GPU host; "
            "mode=parity, mode=export and mode=preflight run on the CPU"
        ]
    if under_launcher():  # torchrun or srun sized the job
        return []
    if p.nnodes > 1:
        return [
            f"parallel.nnodes={p.nnodes}: a job of several nodes needs one launcher per node: use "
            "hydra/launcher=slurm, or torchrun on every node"
        ]
    if p.gpus_per_node is not None and p.gpus_per_node > here:
        return [
            f"parallel.gpus_per_node={p.gpus_per_node} but this host has {here} GPU(s) visible: set "
            f"parallel.gpus_per_node={here} or leave it unset"
        ]
    gpus = p.gpus_per_node or here
    if need > gpus:
        return [f"parallel.tp*pp*cp*dp = {need} GPUs but {gpus} are visible: lower the parallel sizes"]
    total = gpu_memory_gib()
    est = memory_gib_per_gpu(cfg)
    if total is not None and est > 0.9 * total:
        return [
            f"model.name={cfg.model.name}: weights + optimizer state need ~{est:.0f} GiB per GPU, the GPU has "
            f"{total:.0f} GiB: raise parallel.tp/parallel.pp or use a smaller model"
        ]
    return []
