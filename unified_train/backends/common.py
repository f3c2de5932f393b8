"""Pieces both adapters use to describe their native configs in comparable form."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
import os
from unittest import mock

# Runtime hooks that the loops attach to TransformerConfig; never part of a config comparison.
_RUNTIME_FIELDS = {
    "timers", "finalize_model_grads_func", "grad_scale_func", "moe_grad_scale_func", "mtp_grad_scale_func",
    "no_sync_func", "grad_sync_func", "param_sync_func", "_cpu_offloading_context",
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


def schedule_trace(make_scheduler, iters: int, global_batch_size: int) -> dict[str, object]:
    """Learning rate and weight decay in force at every iteration 1..iters, from the stack's own scheduler."""
    optimizer = _ProbeOptimizer()
    scheduler = make_scheduler(optimizer)
    trace = {}
    group = optimizer.param_groups[0]
    for it in range(1, iters + 1):
        trace[f"schedule.lr@{it}"] = float(group["lr"])
        trace[f"schedule.weight_decay@{it}"] = float(group["weight_decay"])
        scheduler.step(increment=global_batch_size)
    return trace


@contextlib.contextmanager
def world(world_size: int, rank: int = 0):
    """The rank environment both stacks read while building configs outside a process group."""
    env = {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:  # MLM asserts it for TP/CP > 1 on Hopper
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    with mock.patch.dict(os.environ, env):
        yield


@contextlib.contextmanager
def quiet():
    """Silence the stacks' banner printing (MLM prints ~800 arguments) while building configs."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def release_process_state() -> None:
    """What either stack leaves in the process after a job, beyond its own globals: the attention-backend
    variables MCore asserts on (a later job with another backend would fail), torch.compile caches, and memory."""
    import gc

    import torch

    for key in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(key, None)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
