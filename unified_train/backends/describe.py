"""The comparable form both adapters describe their native configs in, for the parity diff."""

from __future__ import annotations

import dataclasses
import enum
import functools

# Runtime hooks that the loops attach to TransformerConfig; never part of a config comparison.
_RUNTIME_FIELDS = {
    "timers",
    "finalize_model_grads_func",
    "grad_scale_func",
    "moe_grad_scale_func",
    "mtp_grad_scale_func",
    "no_sync_func",
    "grad_sync_func",
    "param_sync_func",
    "_cpu_offloading_context",
    "experimental_attention_variant_loss_scale_func",
}


def plain(value):
    """A comparable, printable form of a config value (callables by name, enums by name, dtypes as str)."""
    if isinstance(value, functools.partial):
        args = ", ".join([*map(repr, value.args), *(f"{k}={v!r}" for k, v in sorted(value.keywords.items()))])
        return f"{plain(value.func)}({args})"
    if isinstance(value, enum.Enum):
        return value.name
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return float(value)
    return value


def flatten(prefix: str, obj, field_names) -> dict[str, object]:
    return {f"{prefix}.{name}": plain(getattr(obj, name, "<absent>")) for name in field_names}


def dataclass_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _RUNTIME_FIELDS]


class _ProbeOptimizer:
    """The minimum an OptimizerParamScheduler drives: one default parameter group."""

    def __init__(self):
        self.param_groups = [{"default_config": True, "lr_mult": 1.0, "wd_mult": 1.0}]


# A schedule is traced at every iteration up to this many, and beyond at this many iterations spread evenly up to the
# last one: the parity diff of a run of 10^9 iterations stays a few thousand fields.
TRACED_ITERATIONS = 2000


def traced_iterations(iters: int) -> list[int]:
    """Every iteration 1..iters, or (a long run) the first TRACED_ITERATIONS and as many spread over the rest,
    the last included."""
    if iters <= 2 * TRACED_ITERATIONS:
        return list(range(1, iters + 1))
    rest = iters - TRACED_ITERATIONS
    spread = {TRACED_ITERATIONS + (rest * k) // TRACED_ITERATIONS for k in range(1, TRACED_ITERATIONS + 1)}
    return [*range(1, TRACED_ITERATIONS + 1), *sorted(spread)]


def schedule_trace(make_scheduler, iters: int, global_batch_size: int) -> dict[str, object]:
    """Learning rate and weight decay in force at each traced iteration (traced_iterations), from the stack's own
    scheduler. Both depend only on the samples consumed, so the scheduler steps straight to each one."""
    optimizer = _ProbeOptimizer()
    scheduler = make_scheduler(optimizer)
    trace = {}
    group = optimizer.param_groups[0]
    at = 1
    for it in traced_iterations(iters):
        if it > at:
            scheduler.step(increment=global_batch_size * (it - at))
            at = it
        trace[f"schedule.lr@{it}"] = float(group["lr"])
        trace[f"schedule.weight_decay@{it}"] = float(group["weight_decay"])
    return trace


# GPT-model fields outside TransformerConfig, and dataset fields, that both stacks' configs carry by these names.
GPT_FIELDS = (
    "seq_length",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rope_scaling",
    "rope_scaling_factor",
    "share_embeddings_and_output_weights",
    "make_vocab_size_divisible_by",
    "fp16_lm_cross_entropy",
    "seq_len_interpolation_factor",
)
# megatron-core CheckpointConfig fields both stacks carry by these names (plus load_rng/load_optim, which MLM spells
# --no-load-rng/--no-load-optim).
CHECKPOINT_FIELDS = ("save", "save_interval", "load", "ckpt_step", "ckpt_format")
# megatron.training's RerunStateMachineConfig fields, which Bridge's subclass keeps and MLM's flags set (MLM ties the
# loss's NaN check to --check-for-nan-in-loss-and-grad).
RERUN_FIELDS = ("rerun_mode", "check_for_nan_in_loss", "check_for_spiky_loss", "error_injection_rate")
DATASET_FIELDS = (
    "random_seed",
    "blend",
    "blend_per_split",
    "split",
    "split_matrix",
    "mock",
    "reset_position_ids",
    "reset_attention_mask",
    "eod_mask_loss",
    "create_attention_mask",
    "add_extra_token_to_sequence",
    "drop_last_partial_validation_sequence",
)
