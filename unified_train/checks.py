"""Config checks, one function per concern. Each problem is one line, `key=value: what is wrong; the fix`.

Nothing here imports torch or megatron, so bad input is reported in well under a second, before any process-group
or GPU work.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from unified_train import config as C
from unified_train import datafiles, resources, rundir

# Sizes and counts the checks below and both stacks divide by or loop over (None where the field is optional).
_POSITIVE = (
    "parallel.tp",
    "parallel.pp",
    "parallel.cp",
    "parallel.ep",
    "parallel.etp",
    "parallel.dp",
    "parallel.vpp",
    "parallel.nnodes",
    "parallel.gpus_per_node",
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.ffn_hidden_size",
    "model.kv_channels",
    "model.vocab_size",
    "model.make_vocab_size_divisible_by",
    "model.max_position_embeddings",
    "model.num_experts",
    "model.moe_router_topk",
    "model.moe_ffn_hidden_size",
    "train.iters",
    "train.micro_batch_size",
    "train.global_batch_size",
    "train.seq_length",
    "sched.lr_decay_iters",
    "checkpoint.save_interval",
    "validation.eval_interval",
    "logger.log_interval",
    "model.norm_epsilon",
    "model.init_method_std",
    "optim.adam_eps",
)
_NON_NEGATIVE = (
    "checkpoint.load_iteration",
    "sched.lr_warmup_iters",
    "validation.eval_iters",
    "data.num_workers",
    "model.moe_first_dense_layers",
    "optim.lr",
    "optim.min_lr",
    "optim.weight_decay",
    "optim.clip_grad",
    "sched.lr_warmup_init",
    "model.moe_aux_loss_coeff",
    "model.rotary_base",
    "compare.repeats",
)
_FRACTION = ("model.hidden_dropout", "model.attention_dropout", "optim.adam_beta1", "optim.adam_beta2")  # [0, 1)


def check(cfg) -> list[str]:
    """Every problem with the config. Keys outside the schema, values outside their choices or ranges are
    reported alone: the other checks compute with them."""
    errors = unknown_keys(cfg) + choices(cfg) + ranges(cfg)
    if errors:
        return errors
    for concern in (
        topology,
        batch,
        position_table,
        schedule,
        precision,
        determinism,
        data,
        tokenizer,
        kernels,
        resume,
        rerun,
        numerics,
    ):
        errors += concern(cfg)
    return errors


def choices(cfg) -> list[str]:
    errors = []
    for key, allowed in C.choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value}: not one of {', '.join(allowed)}")
    return errors


def unknown_line(key: str) -> str:
    """The one line for a key the schema does not have (also Hydra's own refusal, in validate.py)."""
    return f"{key}: unknown key; check the spelling (python -m unified_train --cfg job lists all keys)"


def unknown_keys(cfg, schema=None, prefix: str = "") -> list[str]:
    """Keys a `+key=value` override added outside the schema (Hydra lets `+` past the struct flag); only
    backend.extra carries free-form native settings."""
    schema = OmegaConf.structured(C.UnifiedConfig) if schema is None else schema
    errors = []
    known = set(schema.keys())  # `in` would miss the schema's mandatory (MISSING) fields
    for key in cfg:
        if key not in known:
            errors.append(unknown_line(f"{prefix}{key}"))
        elif OmegaConf.is_dict(cfg[key]) and OmegaConf.is_dict(schema[key]):
            errors += unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")
    return errors


def ranges(cfg) -> list[str]:
    """Values in range, and the relations between them that a stack asserts inside its loop."""
    errors = []
    for keys, ok, what in (
        (_POSITIVE, lambda v: v > 0, "must be > 0"),
        (_NON_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
        (_FRACTION, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is not None and not ok(value):
                errors.append(f"{key}={value}: {what}")
    if errors:
        return errors
    o, m, p = cfg.optim, cfg.model, cfg.parallel
    if o.lr < o.min_lr:
        errors.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}: raise optim.lr or lower optim.min_lr")
    if m.num_experts is not None and m.moe_router_topk > m.num_experts:
        errors.append(
            f"model.moe_router_topk={m.moe_router_topk} is above model.num_experts={m.num_experts}: "
            f"choose at most {m.num_experts}"
        )
    if p.vpp is not None and p.pp == 1:
        errors.append(
            f"parallel.vpp={p.vpp} interleaves pipeline stages and needs parallel.pp > 1: set "
            "parallel.vpp=null or raise parallel.pp"
        )
    return errors


def topology(cfg) -> list[str]:
    """Heads, query groups, layers and experts split evenly over the parallel sizes."""
    m, p = cfg.model, cfg.parallel
    errors = []
    if m.num_attention_heads % p.tp:
        errors.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}: "
            f"choose parallel.tp from {_divisors(m.num_attention_heads)}"
        )
    groups = m.num_query_groups if m.num_query_groups is not None else m.num_attention_heads
    if m.num_attention_heads % groups:
        errors.append(
            f"model.num_query_groups={groups} does not divide model.num_attention_heads="
            f"{m.num_attention_heads}: choose one of {_divisors(m.num_attention_heads)}"
        )
    elif groups != m.num_attention_heads and groups % p.tp and not m.multi_latent_attention:
        errors.append(
            f"model.num_query_groups={groups} is not divisible by parallel.tp={p.tp}: "
            f"choose parallel.tp from {_divisors(groups)}"
        )
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = "parallel.pp*parallel.vpp" if p.vpp else "parallel.pp"
        errors.append(
            f"model.num_layers={m.num_layers} is not divisible by {what}={stages}: "
            f"choose parallel.pp from {_divisors(m.num_layers)}"
        )
    if p.sequence_parallel and p.tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tp > 1: set parallel.sequence_parallel=false")
    if m.num_experts is not None:
        if m.num_experts % p.ep:
            errors.append(
                f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}: "
                f"choose parallel.ep from {_divisors(m.num_experts)}"
            )
        experts_split = p.ep * (p.etp or p.tp)
        if (resources.world_size(cfg) // p.pp) % experts_split:
            errors.append(
                f"parallel.ep*etp={experts_split} does not divide the {resources.world_size(cfg) // p.pp} ranks of a "
                "pipeline stage: choose parallel.ep and parallel.etp whose product divides them"
            )
        if not 0 <= m.moe_first_dense_layers < m.num_layers:
            errors.append(
                f"model.moe_first_dense_layers={m.moe_first_dense_layers}: must be below "
                f"model.num_layers={m.num_layers}"
            )
    elif p.ep > 1:
        errors.append(f"parallel.ep={p.ep} needs a mixture-of-experts model: set parallel.ep=1")
    elif p.etp is not None:
        errors.append(f"parallel.etp={p.etp} needs a mixture-of-experts model: leave parallel.etp unset")
    if p.cp > 1 and cfg.train.seq_length % (2 * p.cp):
        errors.append(f"train.seq_length={cfg.train.seq_length} is not divisible by 2*parallel.cp={2 * p.cp}")
    return errors


def batch(cfg) -> list[str]:
    t = cfg.train
    dp = resources.data_parallel_size(cfg)
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size"
            f"={t.micro_batch_size} x data-parallel size {dp}: set train.global_batch_size to a multiple "
            f"of {t.micro_batch_size * dp}"
        ]
    return []


def position_table(cfg) -> list[str]:
    seq = cfg.train.seq_length
    if cfg.model.position_embedding_type != "learned_absolute":
        return []
    table = C.position_table_size(cfg)
    if seq > table:
        return [
            f"train.seq_length={seq} is above the position table model.max_position_embeddings={table}: "
            "lower train.seq_length or raise model.max_position_embeddings"
        ]
    if table != seq:
        return [
            f"model.max_position_embeddings={table} differs from train.seq_length={seq}: Bridge sizes the "
            "learned position table from the sequence length, so the stacks would initialise differently; set "
            "model.max_position_embeddings=null"
        ]
    return []


def schedule(cfg) -> list[str]:
    errors = []
    warmup, decay = C.warmup_iters(cfg), C.decay_iters(cfg)
    if warmup >= decay:
        errors.append(
            f"sched.lr_warmup_iters={warmup} must be below the decay length {decay}: "
            f"set sched.lr_warmup_iters=null to derive it"
        )
    return errors


def determinism(cfg) -> list[str]:
    if cfg.determinism.deterministic_mode and cfg.kernels.cross_entropy_loss_fusion:
        return [
            "determinism.deterministic_mode=true needs kernels.cross_entropy_loss_fusion=false (use determinism=strict)"
        ]
    return []


def data(cfg) -> list[str]:
    d = cfg.data
    errors = []
    if d.type == "indexed" and not d.data_path:
        errors.append(
            "data.data_path is empty: give the .bin/.idx prefixes, e.g. data.data_path=[/data/my_text_document]"
        )
    errors += datafiles.problems(cfg)
    if d.type == "mock" and d.data_path:
        errors.append("data.data_path is set but data.type=mock: use data=indexed")
    return errors


def tokenizer(cfg) -> list[str]:
    d = cfg.data
    if d.tokenizer_type == "HuggingFaceTokenizer" and not d.tokenizer_model:
        return ["data.tokenizer_model is unset: give a local tokenizer directory"]
    path = d.tokenizer_model
    # A hub id (org/name) is left to the stacks: it may sit in the local Hugging Face cache.
    if path and path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        return [f"data.tokenizer_model={path}: no such directory: give a local tokenizer directory"]
    return []


def kernels(cfg) -> list[str]:
    k = cfg.kernels
    if k.transformer_impl == "transformer_engine" and not C.te_installed():
        return [
            "kernels.transformer_impl=transformer_engine but Transformer Engine is not installed: "
            "use kernels.transformer_impl=auto or install unified-train[te]"
        ]
    attention = C.attention(cfg)
    if k.attention in ("flex", "sdpa"):
        errors = [f"kernels.attention={k.attention} with {blocker}" for blocker in C.our_attention_blockers(cfg)]
        if k.attention == "sdpa" and cfg.determinism.deterministic_mode:
            errors.append(
                "kernels.attention=sdpa is not deterministic in its backward (cuDNN, flash): use "
                "kernels.attention=flex with determinism=strict"
            )
        return errors
    if attention == "local" and C.transformer_impl(cfg) == "transformer_engine":
        return [
            "kernels.attention=local is megatron-core's DotProductAttention, which the local layer spec builds: "
            "set kernels.transformer_impl=local, or kernels.attention=te for Transformer Engine's"
        ]
    if attention == "te" and C.transformer_impl(cfg) != "transformer_engine":
        return [
            "kernels.attention=te needs Transformer Engine's layer spec: install unified-train[te] and set "
            "kernels.transformer_impl=auto, or choose kernels.attention=flex"
        ]
    if attention == "local" and cfg.model.multi_latent_attention:
        why = f" ({C.our_attention_blockers(cfg)[0]})" if k.attention == "auto" else ""
        return [
            f"model.multi_latent_attention=true cannot run on kernels.attention=local{why}: megatron-core's "
            "local DotProductAttention has no separate key/value head sizes; use kernels.attention=flex"
        ]
    return []


def precision(cfg) -> list[str]:
    """bf16 gradients are reduced in fp32 on both stacks (MLM turns it on by itself, megatron/training/arguments.py):
    a unified `false` would be ignored by both."""
    if cfg.precision.dtype == "bf16" and not cfg.precision.grad_reduce_in_fp32:
        return [
            "precision.grad_reduce_in_fp32=false: both stacks reduce bf16 gradients in fp32 (Megatron-LM requires "
            "it); leave it true (false applies to precision.dtype=fp16)"
        ]
    return []


def resume(cfg) -> list[str]:
    """Both stacks start from scratch, with a warning only, when `load` holds no checkpoint, and fail late on an
    iteration that is not there: a resume that was asked for but would not happen is refused."""
    load, asked = cfg.checkpoint.load, cfg.checkpoint.load_iteration
    if load is None:
        return (
            ["checkpoint.load_iteration is set but checkpoint.load is not: give checkpoint.load=DIR"] if asked else []
        )
    if not os.path.isdir(load):
        return [f"checkpoint.load={load}: no such directory"]
    checkpoints, in_path = rundir.split_checkpoint_path(load)
    if in_path is not None:
        if asked is not None and asked != in_path:
            return [f"checkpoint.load_iteration={asked} but checkpoint.load names iteration {in_path}: give one"]
        return []
    if not rundir.holds_checkpoint(load):
        hint = os.path.join(load, rundir.CHECKPOINTS)
        fix = f"checkpoint.load={hint}" if rundir.holds_checkpoint(hint) else "a run's checkpoints/ directory"
        return [
            f"checkpoint.load={load} holds no checkpoint (no {rundir.CHECKPOINT_TRACKER}), so neither stack would "
            f"resume: give {fix}"
        ]
    saved = rundir.saved_iterations(checkpoints)
    if asked is not None and asked not in saved:
        return [
            f"checkpoint.load_iteration={asked}: {load} holds iterations {','.join(map(str, saved)) or 'none'}: "
            "give one of them, or leave it unset for the latest"
        ]
    return cross_stack(cfg, checkpoints)


def rerun(cfg) -> list[str]:
    """validate_results ends a job whose loss failed its check by saving a checkpoint to rerun from; with nothing to
    save to, MLM fails there with a TypeError (megatron/training/checkpointing.py) in place of the check's message."""
    if cfg.train.rerun_mode == "validate_results" and not cfg.checkpoint.save:
        return [
            "train.rerun_mode=validate_results saves a checkpoint when a loss fails its check, but checkpoint.save is "
            "false: set checkpoint.save=true, or train.rerun_mode=disabled"
        ]
    return []


def cross_stack(cfg, checkpoints: str) -> list[str]:
    """A checkpoint of one stack loaded by the other (measured exact at tp=pp=ep=1, docs/measurements.md). Read from
    the stacks' code, not run (one GPU): Bridge stores no MLM `args`, so MLM takes the checkpoint for tp=pp=1 and
    refuses other splits with the distributed optimizer (megatron/training/checkpointing.py, the (TP, PP) mismatch
    RuntimeError); with ep > 1 the two stacks shard the RNG state differently."""
    writer, p = rundir.checkpoint_writer(checkpoints), cfg.parallel
    if writer == cfg.backend.name:
        return []
    if writer == "bridge" and (p.tp > 1 or p.pp > 1):
        return [
            f"checkpoint.load={cfg.checkpoint.load} was written by Megatron-Bridge, whose checkpoints carry no "
            "Megatron-LM args: backend=mlm resumes them only at parallel.tp=1 parallel.pp=1; resume with backend=bridge"
        ]
    if p.ep > 1:
        return [
            f"checkpoint.load={cfg.checkpoint.load} was written by the other stack, which shards the RNG state "
            f"differently with parallel.ep={p.ep}: resume with backend={writer}"
        ]
    return []


def numerics(cfg) -> list[str]:
    """mode=numerics records the first iteration of a run from scratch and saves no checkpoint (modes/numerics.py):
    a loaded checkpoint would already be past that iteration, and a restart has nothing to continue."""
    if cfg.mode != "numerics":
        return []
    errors = []
    if cfg.checkpoint.load:
        errors.append(
            f"checkpoint.load={cfg.checkpoint.load}: mode=numerics records iteration 1 of a run from scratch: "
            "unset checkpoint.load"
        )
    if cfg.checkpoint.resume != "never":
        errors.append(
            f"checkpoint.resume={cfg.checkpoint.resume}: mode=numerics saves no checkpoint to continue from: set "
            "checkpoint.resume=never"
        )
    return errors


def _divisors(n: int) -> str:
    return "{" + ",".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"
