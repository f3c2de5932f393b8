"""megatron-core's real optimizer, DDP and GPT model on the CPU, for the job scripts the CPU tests run
(tests/resume_optimizer_job.py, tests/numerics_job.py): megatron-core puts buffers and masks on "cuda", checks
`Tensor.type()` for torch.cuda.*, and asks for the current CUDA device and a synchronize; here all of that means the
CPU, so megatron's own code runs unchanged."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        if getattr(func, "__name__", "") == "cuda":
            return args[0]
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and isinstance(out, str):
            return out.replace("torch.", "torch.cuda.", 1)
        return out


def cuda_on_cpu() -> CudaOnCpu:
    """The device calls outside tensors, pointed at the CPU; enter the returned mode around megatron's code."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    return CudaOnCpu()
