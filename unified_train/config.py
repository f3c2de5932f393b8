"""The unified config schema: primitive-typed dataclasses registered in Hydra's ConfigStore.

One field per concept. Each knob that both stacks must agree on lives here exactly once; the backend adapters
translate it into their native places (see `mcore_fields.py`). Defaults reproduce Megatron-Bridge's
`vanilla_gpt_pretrain_config` numerics on both backends. A field with a closed set of values declares it beside
the field (`one_of`); `choices()` collects them for the up-front checks. No heavy imports in this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

BACKEND_NAMES = ("mlm", "bridge")
MODES = ("train", "parity", "export", "preflight", "numerics")
# Modes that run a training job (a GPU, a run directory): numerics is one recorded iteration (modes/numerics.py).
TRAINING_MODES = ("train", "numerics")
# Modes that only build both native configs and print (no GPU, no process group): they write nothing.
BUILDS_ONLY_MODES = ("parity", "export")


def one_of(*allowed: str, default: str | None = None):
    """A string field whose value must be one of `allowed` (the first, unless `default` says otherwise); the
    up-front checks read the allowed values from here (`choices`)."""
    return field(default=allowed[0] if default is None else default, metadata={"choices": allowed})


@dataclass
class BackendConfig:
    name: str = one_of(*BACKEND_NAMES, default=MISSING)  # chosen by the `backend` config group
    # Raw native settings appended after the translated ones (MLM flags, or Bridge `a.b=c` overrides).
    # They bypass the parity guarantee, so the parity diff reports them.
    extra: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Architecture only. A preset (`conf/model/<name>.yaml`) sets these and nothing else."""

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None  # None: multi-head attention (groups = heads)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size (both stacks agree without SwiGLU)
    kv_channels: Optional[int] = None  # None: hidden_size / heads
    vocab_size: int = 32000  # NullTokenizer vocabulary for mock data; padded by make_vocab_size_divisible_by * tp
    make_vocab_size_divisible_by: int = 128
    # Learned position table size. None: train.seq_length (Bridge always sizes it from the sequence length).
    max_position_embeddings: Optional[int] = None
    position_embedding_type: str = one_of("learned_absolute", "rope", "none")
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama-3.1-style frequency scaling
    rope_scaling_factor: float = 8.0
    normalization: str = one_of("LayerNorm", "RMSNorm")
    norm_epsilon: float = 1e-5
    activation: str = one_of("gelu", "swiglu")
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    # Mixture of experts (num_experts None: dense).
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_first_dense_layers: int = 0  # leading dense layers before the MoE layers (DeepSeek's first_k_dense)
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    # Multi-latent attention (DeepSeek).
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    rope_type: str = "yarn"  # MLA only: yarn | rope
    rotary_scaling_factor: float = 40.0  # MLA YaRN
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class KernelsConfig:
    """Implementation choices that change numerics. Set once here, translated to both stacks."""

    # auto: Transformer Engine spec when `transformer_engine` imports, otherwise the local (torch) spec.
    transformer_impl: str = one_of("auto", "local", "transformer_engine")
    # The core attention (softmax(QK^T)V) both stacks build: local = megatron-core's unfused DotProductAttention
    # (materialises the s x s scores), flex = torch flex_attention (compiled, deterministic), sdpa = torch SDPA
    # (cuDNN/flash; fastest, backward not deterministic), te = Transformer Engine's. auto: te with TE's spec,
    # otherwise flex where the config allows it (our_attention_blockers), else local. See kernels/attention.py.
    attention: str = one_of("auto", "local", "flex", "sdpa", "te")
    # megatron-core's AttnBackend: which of TE's kernels its attention uses (only with kernels.attention=te).
    attention_backend: str = one_of("auto", "local", "unfused", "fused", "flash")
    # Bridge vanilla values. MLM's CLI defaults differ (fused tanh-GeLU, fused bias-dropout, unfused CE).
    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    cross_entropy_loss_fusion: bool = True
    cross_entropy_fusion_impl: str = "native"
    apply_rope_fusion: bool = False
    attention_softmax_in_fp32: bool = False  # MLM's and GPTModelProvider's value (Bridge's MLA provider: true)
    # These three need apex or TE kernels that the local spec on a plain torch install does not have.
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallel (MoE)
    etp: Optional[int] = None  # expert tensor parallel (MoE); None: parallel.tp, megatron-core's default
    dp: Optional[int] = None  # None: every visible GPU not used by tp*pp*cp
    vpp: Optional[int] = None  # virtual pipeline stages per rank
    sequence_parallel: bool = False
    nnodes: int = 1
    gpus_per_node: Optional[int] = None  # None: the visible GPUs


@dataclass
class TrainConfig:
    iters: int = 10
    micro_batch_size: int = 4
    global_batch_size: int = 32
    seq_length: int = 512
    # What both stacks do when a loss fails its NaN/Inf check (megatron-core's rerun state machine). disabled: the
    # job fails at once, naming the check. validate_results: the iteration is run again in place, then the job saves
    # a checkpoint and exits for a rerun elsewhere (so it needs checkpoint.save). MLM's default is validate_results,
    # Bridge's is disabled; one choice here sets both.
    rerun_mode: str = one_of("disabled", "validate_results")


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.033  # Bridge's effective value (scheduler start = end weight decay)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class SchedConfig:
    lr_decay_style: str = one_of("constant", "linear", "cosine", "inverse-square-root", "WSD", default="cosine")
    # None: derived (config.warmup_iters): Bridge's 500 when the run is long enough, else 10%.
    lr_warmup_iters: Optional[int] = None
    lr_decay_iters: Optional[int] = None  # None: train.iters
    lr_warmup_init: float = 0.0


@dataclass
class DataConfig:
    type: str = one_of("mock", "indexed")
    data_path: list[str] = field(default_factory=list)  # indexed: "[weight] prefix" entries of .bin/.idx pairs
    split: str = "9999,8,2"  # indexed only; mock data is always split 1,1,1 by MCore
    tokenizer_type: str = one_of("NullTokenizer", "HuggingFaceTokenizer")
    tokenizer_model: Optional[str] = None  # HuggingFaceTokenizer: a local path
    seed: Optional[int] = None  # None: rng.seed
    num_workers: int = 2
    # single: a sequential pass (both stacks' default for training). cyclic: the epoch-seeded random sampler, which
    # both stacks share; Bridge always validates GPT data with it, so only `cyclic` gives both backends the same
    # validation samples (with `single`, MLM validates sequentially and the validation losses differ).
    dataloader_type: str = one_of("single", "cyclic")
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class PrecisionConfig:
    dtype: str = one_of("bf16", "fp16", "fp32")
    grad_reduce_in_fp32: bool = True


RESUME_POLICIES = ("never", "if_available", "always")


@dataclass
class CheckpointConfig:
    save: bool = True  # into <run dir>/checkpoints
    save_interval: Optional[int] = None  # None: only at the end of training
    format: str = one_of("torch_dist", "torch_dcp", "torch", "fsdp_dtensor")  # MLM's --ckpt-format choices
    load: Optional[str] = None  # a checkpoints/ directory (or one iter_* directory of it) to start from
    load_iteration: Optional[int] = None  # None: the latest iteration in `load`
    # never: only `load`, and a run directory holding a run is refused. if_available: a job started again in its own
    # run directory (a Slurm requeue) continues from its own latest checkpoint, if the same config wrote it; else
    # from `load`, else from scratch. always: as if_available, but starting from scratch is refused.
    resume: str = one_of(*RESUME_POLICIES)
    # On this signal both stacks save a checkpoint at the end of the iteration and stop (then, in a submitit job,
    # submitit requeues it). auto: submitit's requeue signal in a submitit job, else SIGTERM. none: no handler.
    exit_signal: str = one_of("auto", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "none")


@dataclass
class ValidationConfig:
    eval_interval: Optional[int] = None  # None: min(500, train.iters) (Bridge's 500, capped)
    eval_iters: int = 2


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "unified_train"
    entity: Optional[str] = None
    mode: Optional[str] = None  # None: online with WANDB_API_KEY set, offline otherwise; or online|offline|disabled


@dataclass
class LoggerConfig:
    log_interval: int = 1
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RngConfig:
    seed: int = 1234


@dataclass
class DeterminismConfig:
    # torch.use_deterministic_algorithms + NCCL_ALGO=Ring, CUBLAS_WORKSPACE_CONFIG, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0.
    # Both stacks require kernels.cross_entropy_loss_fusion=false with it.
    deterministic_mode: bool = False


@dataclass
class LaunchConfig:
    isolation: str = one_of("inprocess", "process")  # process: a fresh worker process per job


@dataclass
class CompareConfig:
    """What the comparison after a multirun measures. Not part of the pair id (rundir.pair_id leaves it out)."""

    # The noise floor: each training job trains this many more times with the identical config after its main run,
    # into <run dir>/repeats/<k>/ (runtime/repeats.py); compare reads each backend's run-to-run spread from them.
    repeats: int = 0


@dataclass
class UnifiedConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    rng: RngConfig = field(default_factory=RngConfig)
    determinism: DeterminismConfig = field(default_factory=DeterminismConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    mode: str = one_of(*MODES)
    run_dir: Optional[str] = None  # None: the Hydra job directory


def choices(schema=None, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every `one_of` field of the schema as {dotted key: allowed values}."""
    out = {}
    for f in dataclasses.fields(schema or UnifiedConfig):
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata:
            out[key] = f.metadata["choices"]
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(choices(f.default_factory, f"{key}."))
    return out


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can validate against it (`defaults: [schema, ...]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=UnifiedConfig)


# ---------------------------------------------------------------------------------------------------------------
# Derived values: computed once here so both translators agree.


def warmup_iters(cfg) -> int:
    """Bridge's 500 when the run is long enough, else 10 % of it, and always below the decay length (MLM asserts
    it; a one-iteration run gets none)."""
    if cfg.sched.lr_warmup_iters is not None:
        return cfg.sched.lr_warmup_iters
    return min(500, max(1, cfg.train.iters // 10), decay_iters(cfg) - 1)


def decay_iters(cfg) -> int:
    return cfg.sched.lr_decay_iters if cfg.sched.lr_decay_iters is not None else cfg.train.iters


def eval_interval(cfg) -> int:
    return cfg.validation.eval_interval if cfg.validation.eval_interval is not None else min(500, cfg.train.iters)


def data_seed(cfg) -> int:
    return cfg.data.seed if cfg.data.seed is not None else cfg.rng.seed


def position_table_size(cfg) -> int:
    m = cfg.model.max_position_embeddings
    return m if m is not None else cfg.train.seq_length


def ffn_hidden_size(cfg) -> int:
    m = cfg.model
    return m.ffn_hidden_size if m.ffn_hidden_size is not None else 4 * m.hidden_size


@functools.cache
def te_installed() -> bool:
    """Whether Transformer Engine can be imported (looked up once per process, without importing it)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def transformer_impl(cfg) -> str:
    """The layer spec both stacks build: kernels.transformer_impl, with auto resolved by what is installed."""
    impl = cfg.kernels.transformer_impl
    if impl != "auto":
        return impl
    return "transformer_engine" if te_installed() else "local"


def our_attention_blockers(cfg) -> list[str]:
    """What keeps our own core attention (flex, sdpa) from this config, one `key=value: why; fix` each. The
    kernels implement causal self-attention on whole sequences, in the local layer spec."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    out = []
    if m.attention_dropout > 0:
        out.append(
            f"model.attention_dropout={m.attention_dropout}: flex and sdpa cannot drop attention "
            "probabilities; set model.attention_dropout=0.0"
        )
    if p.cp > 1:
        out.append(f"parallel.cp={p.cp}: our core attention has no context-parallel exchange; set parallel.cp=1")
    if d.reset_attention_mask:
        out.append("data.reset_attention_mask=true: per-document masks need kernels.attention=local")
    if cfg.kernels.attention_backend == "local":
        # Both model builders then write DotProductAttention back over the spec's core attention.
        out.append(
            "kernels.attention_backend=local: it selects megatron-core's DotProductAttention; set "
            "kernels.attention_backend=auto"
        )
    if transformer_impl(cfg) == "transformer_engine":
        out.append(
            "kernels.transformer_impl resolves to transformer_engine: flex and sdpa run in the local layer "
            "spec; set kernels.transformer_impl=local or kernels.attention=te"
        )
    return out


def attention(cfg) -> str:
    """The core attention a job runs (never auto): what run.json records and both adapters build."""
    choice = cfg.kernels.attention
    if choice != "auto":
        return choice
    if transformer_impl(cfg) == "transformer_engine":
        return "te"
    return "local" if our_attention_blockers(cfg) else "flex"


# submitit's own: the signal it requeues a job on (timeout or preemption), and a variable every submitit job has.
SUBMITIT_SIGNAL_VARIABLE, SUBMITIT_JOB_VARIABLE = "SUBMITIT_PREEMPT_SIGNAL", "SUBMITIT_EXECUTOR"


def exit_signal(cfg) -> str | None:
    """The signal name (e.g. "SIGUSR2") on which the stacks save and stop, or None (checkpoint.exit_signal)."""
    choice = cfg.checkpoint.exit_signal
    if choice == "none" or not cfg.checkpoint.save:
        return None
    if choice != "auto":
        return choice
    if os.environ.get(SUBMITIT_JOB_VARIABLE):
        return "SIG" + os.environ.get(SUBMITIT_SIGNAL_VARIABLE, "USR2")
    return "SIGTERM"
