"""The unified config schema: primitive-typed dataclasses registered in Hydra's ConfigStore.

One field per concept. Each knob that both stacks must agree on lives here exactly once; the backend adapters
translate it into their native places (see `mcore_fields.py`). Defaults reproduce Megatron-Bridge's
`vanilla_gpt_pretrain_config` numerics on both backends. No heavy imports in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class BackendConfig:
    name: str = MISSING  # "mlm" | "bridge"; chosen by the `backend` config group
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
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | none
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama-3.1-style frequency scaling
    rope_scaling_factor: float = 8.0
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    norm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | swiglu
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
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    attention_backend: str = "auto"  # auto | local | unfused | fused | flash
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
    lr_decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root | WSD
    # None: min(500, max(1, train.iters // 10)) -- Bridge's 500 when the run is long enough, else 10%.
    lr_warmup_iters: Optional[int] = None
    lr_decay_iters: Optional[int] = None  # None: train.iters
    lr_warmup_init: float = 0.0


@dataclass
class DataConfig:
    type: str = "mock"  # mock | indexed
    data_path: list[str] = field(default_factory=list)  # indexed: "[weight] prefix" entries of .bin/.idx pairs
    split: str = "9999,8,2"  # indexed only; mock data is always split 1,1,1 by MCore
    tokenizer_type: str = "NullTokenizer"  # NullTokenizer | HuggingFaceTokenizer
    tokenizer_model: Optional[str] = None  # HuggingFaceTokenizer: a local path
    seed: Optional[int] = None  # None: rng.seed
    num_workers: int = 2
    # single: a sequential pass (both stacks' default for training). cyclic: the epoch-seeded random sampler, which
    # both stacks share; Bridge always validates GPT data with it, so only `cyclic` gives both backends the same
    # validation samples (with `single`, MLM validates sequentially and the validation losses differ).
    dataloader_type: str = "single"
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    grad_reduce_in_fp32: bool = True


@dataclass
class CheckpointConfig:
    save: bool = True  # into <run dir>/checkpoints
    save_interval: Optional[int] = None  # None: only at the end of training
    format: str = "torch_dist"
    load: Optional[str] = None  # resuming is explicit: a checkpoint directory, never picked up implicitly


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
    isolation: str = "inprocess"  # inprocess | process (a fresh worker process per job)


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
    mode: str = "train"  # train | parity | export | preflight
    run_dir: Optional[str] = None  # None: the Hydra job directory


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can validate against it (`defaults: [schema, ...]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=UnifiedConfig)


# ---------------------------------------------------------------------------------------------------------------
# Derived values: computed once here so both translators agree.


def warmup_iters(cfg) -> int:
    if cfg.sched.lr_warmup_iters is not None:
        return cfg.sched.lr_warmup_iters
    return min(500, max(1, cfg.train.iters // 10))


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
