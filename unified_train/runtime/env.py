"""The process environment and compiler settings every job runs under, identically for both backends, so a
Bridge job and an MLM job see the same NCCL/cuBLAS/inductor settings and a pair run in one process matches two
separate processes."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

# Set for every job (and every spawned rank) before the first CUDA/NCCL use.
BASE_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # required for TP/CP comm ordering on Hopper
    "NCCL_NVLS_ENABLE": "0",  # NVLink multicast is not available on the lent nodes
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    # megatron-core's fused kernels are torch.compile'd. Inductor otherwise picks reduction kernels by timing
    # them (and caches the pick on disk for later processes), and dynamo reuses dynamic-shape profiles that
    # earlier processes left on disk; either changes the rounding from one process to the next. These make
    # compiled numerics a function of the code alone (with pin_compiler_determinism, which keeps the first
    # in force for every compile).
    "TORCHINDUCTOR_DETERMINISTIC": "1",
    "TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO": "0",
    # Every process compiles for itself, so no graph compiled by another process (under other settings, perhaps
    # by another tool) is reused. Whether the caches are safe with the picks pinned is not measured.
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
}
DETERMINISTIC_ENV = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def process_env(cfg) -> dict[str, str]:
    env = dict(BASE_ENV)
    if cfg.determinism.deterministic_mode:
        env.update(DETERMINISTIC_ENV)
    return env


@contextlib.contextmanager
def job_environment(cfg):
    """The job's process environment, for work that builds native configs outside a job (parity, export):
    Bridge's validation reads NCCL_ALGO under determinism and switches deterministic algorithms on globally."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    with mock.patch.dict(os.environ, process_env(cfg)):
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)


def pin_compiler_determinism() -> None:
    """The compiler settings of BASE_ENV, for when torch's compiler configs were imported before the environment
    was set, and kept in force for every compile of the process (tests/test_compile_determinism.py)."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    keep_inductor_deterministic()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.automatic_dynamic_local_pgo = False
    # torch 2.11's dynamo ends every frame it compiles with torch.use_deterministic_algorithms(<eager flag>), and
    # that call also sets inductor's `deterministic` (to False, as eager determinism is off). Every later compile,
    # and every backward (compiled lazily, at the first backward call), would then choose its reduction kernels
    # by timing them, and cache the winner on disk for later processes: the numerics would depend on the node's
    # timing noise and on what ran there before. So the setting is restored as each compile starts.
    handler = torch._dynamo.callback_handler
    if keep_inductor_deterministic not in handler.start_callbacks:
        handler.register_start_callback(keep_inductor_deterministic)


def keep_inductor_deterministic(_args=None) -> None:
    import torch._inductor.config

    torch._inductor.config.deterministic = True
