"""What the stacks read from the process while their configs are built, and what they leave in it after a job."""

from __future__ import annotations

import contextlib
import io
import os
from unittest import mock


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
