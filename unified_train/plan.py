"""From a composed config to a runnable job: world size, topology and memory checks, pair id, run dir.

Every check returns a one-line message naming the key and the fix. Nothing here imports torch or megatron,
so bad input is reported in well under a second, before any process-group or GPU work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from omegaconf import OmegaConf

from unified_train import config as C
from unified_train import datafiles

CHOICES = {
    "backend.name": ("mlm", "bridge"),
    "model.position_embedding_type": ("learned_absolute", "rope", "none"),
    "model.normalization": ("LayerNorm", "RMSNorm"),
    "model.activation": ("gelu", "swiglu"),
    "kernels.transformer_impl": ("auto", "local", "transformer_engine"),
    "kernels.attention_backend": ("auto", "local", "unfused", "fused", "flash"),
    "sched.lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "data.type": ("mock", "indexed"),
    "data.dataloader_type": ("single", "cyclic"),
    "data.tokenizer_type": ("NullTokenizer", "HuggingFaceTokenizer"),
    "precision.dtype": ("bf16", "fp16", "fp32"),
    "launch.isolation": ("inprocess", "process"),
    "mode": ("train", "parity", "export", "preflight"),
}

# Keys that do not change what is trained: excluded from the pair id so both halves of a pair (and reruns) match.
_NOT_NUMERICS = ("backend", "logger", "launch", "mode", "run_dir", "checkpoint")


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def model_parallel_size(cfg) -> int:
    p = cfg.parallel
    return p.tp * p.pp * p.cp


def world_size(cfg) -> int:
    """tp * pp * cp * dp. dp defaults to every GPU left over (all nodes), or the launcher's WORLD_SIZE."""
    mp = model_parallel_size(cfg)
    if cfg.parallel.dp is not None:
        return mp * cfg.parallel.dp
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    gpus = (cfg.parallel.gpus_per_node or visible_gpus()) * cfg.parallel.nnodes
    return mp * max(1, gpus // mp)


def data_parallel_size(cfg) -> int:
    return world_size(cfg) // model_parallel_size(cfg)


def check(cfg) -> list[str]:
    """Every problem with the config, one line each: `key=value: what is wrong; the fix`."""
    errors: list[str] = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value}: not one of {', '.join(allowed)}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(p, key) < 1:
            errors.append(f"parallel.{key}={getattr(p, key)}: must be >= 1")
    if errors:
        return errors
    if m.num_attention_heads % p.tp:
        errors.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}: "
                      f"choose parallel.tp from {_divisors(m.num_attention_heads)}")
    groups = m.num_query_groups if m.num_query_groups is not None else m.num_attention_heads
    if m.num_attention_heads % groups:
        errors.append(f"model.num_query_groups={groups} does not divide model.num_attention_heads="
                      f"{m.num_attention_heads}: choose one of {_divisors(m.num_attention_heads)}")
    elif groups != m.num_attention_heads and groups % p.tp and not m.multi_latent_attention:
        errors.append(f"model.num_query_groups={groups} is not divisible by parallel.tp={p.tp}: "
                      f"choose parallel.tp from {_divisors(groups)}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = "parallel.pp*parallel.vpp" if p.vpp else "parallel.pp"
        errors.append(f"model.num_layers={m.num_layers} is not divisible by {what}={stages}: "
                      f"choose parallel.pp from {_divisors(m.num_layers)}")
    if p.sequence_parallel and p.tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tp > 1: set parallel.sequence_parallel=false")
    if m.num_experts is not None:
        if m.num_experts % p.ep:
            errors.append(f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}: "
                          f"choose parallel.ep from {_divisors(m.num_experts)}")
        if not 0 <= m.moe_first_dense_layers < m.num_layers:
            errors.append(f"model.moe_first_dense_layers={m.moe_first_dense_layers}: must be below "
                          f"model.num_layers={m.num_layers}")
    elif p.ep > 1:
        errors.append(f"parallel.ep={p.ep} needs a mixture-of-experts model: set parallel.ep=1")
    dp = data_parallel_size(cfg)
    if t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size"
                      f"={t.micro_batch_size} x data-parallel size {dp}: set train.global_batch_size to a multiple "
                      f"of {t.micro_batch_size * dp}")
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        errors.append(f"train.seq_length={t.seq_length} is not divisible by 2*parallel.cp={2 * p.cp}")
    if m.position_embedding_type == "learned_absolute":
        table = C.position_table_size(cfg)
        if t.seq_length > table:
            errors.append(f"train.seq_length={t.seq_length} is above the position table model.max_position_embeddings"
                          f"={table}: lower train.seq_length or raise model.max_position_embeddings")
        elif table != t.seq_length:
            errors.append(f"model.max_position_embeddings={table} differs from train.seq_length={t.seq_length}: "
                          "Bridge sizes the learned position table from the sequence length, so the stacks would "
                          "initialise differently; set model.max_position_embeddings=null")
    warmup, decay = C.warmup_iters(cfg), C.decay_iters(cfg)
    if warmup >= decay:
        errors.append(f"sched.lr_warmup_iters={warmup} must be below the decay length {decay}: "
                      f"set sched.lr_warmup_iters=null to derive it")
    if t.iters < 1:
        errors.append(f"train.iters={t.iters}: must be >= 1")
    if cfg.determinism.deterministic_mode and cfg.kernels.cross_entropy_loss_fusion:
        errors.append("determinism.deterministic_mode=true needs kernels.cross_entropy_loss_fusion=false "
                      "(use determinism=strict)")
    if cfg.data.type == "indexed" and not cfg.data.data_path:
        errors.append("data.data_path is empty: give the .bin/.idx prefixes, e.g. data.data_path=[/data/my_text_document]")
    errors += datafiles.problems(cfg)
    if cfg.data.type == "mock" and cfg.data.data_path:
        errors.append("data.data_path is set but data.type=mock: use data=indexed")
    tokenizer = cfg.data.tokenizer_model
    if cfg.data.tokenizer_type == "HuggingFaceTokenizer" and not tokenizer:
        errors.append("data.tokenizer_model is unset: give a local tokenizer directory")
    elif tokenizer and tokenizer.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(tokenizer)):
        # A hub id (org/name) is left to the stacks: it may sit in the local Hugging Face cache.
        errors.append(f"data.tokenizer_model={tokenizer}: no such directory: give a local tokenizer directory")
    if cfg.kernels.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        errors.append("kernels.transformer_impl=transformer_engine but Transformer Engine is not installed: "
                      "use kernels.transformer_impl=auto or install unified-train[te]")
    if cfg.checkpoint.load is not None:
        errors += _resume_problems(cfg.checkpoint.load)
    return errors


# Both stacks' checkpoint directories hold this tracker; an iteration directory can be given instead.
_TRACKER = "latest_checkpointed_iteration.txt"


def _resume_problems(load: str) -> list[str]:
    """Both stacks start from scratch, with a warning only, when `load` holds no checkpoint: a resume that was
    asked for but would not happen is refused."""
    if not os.path.isdir(load):
        return [f"checkpoint.load={load}: no such directory"]
    if os.path.isfile(os.path.join(load, _TRACKER)) or os.path.basename(load.rstrip("/")).startswith("iter_"):
        return []
    hint = os.path.join(load, "checkpoints")
    fix = f"checkpoint.load={hint}" if os.path.isfile(os.path.join(hint, _TRACKER)) else "a run's checkpoints/ directory"
    return [f"checkpoint.load={load} holds no checkpoint (no {_TRACKER}), so neither stack would resume: give {fix}"]


def _divisors(n: int) -> str:
    return "{" + ",".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pair_id(cfg, also_exclude: tuple[str, ...] = ()) -> str:
    """A stable hash of everything that determines the numerics: identical for both halves of a pair."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_NUMERICS:
        data.pop(key, None)
    for dotted in also_exclude:
        section, _, leaf = dotted.partition(".")
        data.get(section, {}).pop(leaf, None)
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tp_group_id(cfg) -> str:
    """Runs that differ only in how the model is split over tensor-parallel ranks (same global batch): the
    cross-TP convergence table compares these, per backend."""
    return pair_id(cfg, also_exclude=("parallel.tp", "parallel.sequence_parallel", "parallel.dp"))


# Files Hydra itself writes into a job directory before the job runs.
_HYDRA_OWN = (".hydra",)


def output_dir_key(cfg, multirun: bool) -> str:
    """The key a user changes to move a job's output directory."""
    if cfg.run_dir:
        return "run_dir"
    return "hydra.sweep.dir" if multirun else "hydra.run.dir"


def check_run_dir(run_dir: str, key: str = "run_dir", started: bool = True) -> str | None:
    """A run never starts in a directory that already holds a run's output (nothing is overwritten). Once Hydra
    has `started` the job it has written its own record (.hydra) and job log there; before, those are a run's too."""
    if not os.path.isdir(run_dir):
        return None
    leftovers = [f for f in os.listdir(run_dir) if not (started and (f in _HYDRA_OWN or f.endswith(".log")))]
    if leftovers:
        return (f"{key}: {run_dir} already holds {', '.join(sorted(leftovers)[:4])}: "
                f"choose a new {key}; resuming is explicit via checkpoint.load")
    return None


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
    """Start nvidia-smi for the first visible GPU's memory, once per process and in the background: bringing the
    driver up can take it seconds, which then overlap with composing the jobs. None without a GPU."""
    import subprocess

    if not visible_gpus():
        return None
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


@functools.cache
def gpu_memory_gib() -> float | None:
    """Memory of the first visible GPU in GiB, from nvidia-smi (no torch), or None when it cannot be read."""
    import subprocess

    proc = query_gpu_memory()
    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=10)
        return float(out.split()[0]) / 1024 if proc.returncode == 0 and out.strip() else None
    except (ValueError, subprocess.TimeoutExpired):
        proc.kill()
        return None


def check_resources(cfg) -> list[str]:
    """For a training job started here: enough GPUs, and weights + optimizer state that fit them."""
    if cfg.mode != "train" or "WORLD_SIZE" in os.environ:  # under torchrun/Slurm the launcher sized the job
        return []
    gpus = (cfg.parallel.gpus_per_node or visible_gpus()) * cfg.parallel.nnodes
    need = world_size(cfg)
    if gpus == 0:
        return [f"no GPU is visible: training needs {need} (mode=parity and mode=export run on the CPU)"]
    if need > gpus:
        return [f"parallel.tp*pp*cp*dp = {need} GPUs but {gpus} are visible: lower the parallel sizes"]
    total = gpu_memory_gib()
    est = memory_gib_per_gpu(cfg)
    if total is not None and est > 0.9 * total:
        return [f"model.name={cfg.model.name}: weights + optimizer state need ~{est:.0f} GiB per GPU, the GPU has "
                f"{total:.0f} GiB: raise parallel.tp/parallel.pp or use a smaller model"]
    return []
