"""Recording for mode=numerics, shared by both adapters: through hooks on the stack's real model chunks, every module's
forward output and every parameter's gradient in the first training iteration, one record each.

Both stacks build megatron-core modules from the same layer spec, so once the wrappers (DDP, Float16Module) are
unwrapped the module names agree between them; a layer is named by its global number (`layer_number`), which a
pipeline stage's local index is not. A record holds the shape, dtype, float64 norm and the sha256 of the raw bytes:
the hash says whether two runs agree bit for bit, the norm how far apart they are when they do not.

Order, which results/numerics.py localises by: output records in the order the modules finish (a module finishes
after its children, so the first differing output is the innermost module where a difference appears); gradient
records, read before the optimizer's first step (clipping later scales the gradient buffer in place), in reverse
registration order, the order backward produces them. Each rank writes its own file (rundir.write_numerics).
"""

from __future__ import annotations

import hashlib
import math
import re

from unified_train import rundir

ROOT = "(model)"  # the name of a model chunk itself (its output is the loss per token)
_NORM_CHUNK = 1 << 24  # elements per float64 chunk of a norm: a bounded copy whatever the tensor's size
_LAYER = re.compile(r"^(.*\.)?layers\.(\d+)$")


def first_tensor(output):
    """A module's output as a tensor: itself, or the first tensor of a (nested) tuple or list, e.g. a linear
    layer's (output, bias) or a router's (probabilities, routing map); None when there is none."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def describe(tensor) -> dict:
    """Shape, dtype, float64 norm and the sha256 of the bytes, as they are in memory."""
    import torch

    t = tensor.detach()
    flat = t.contiguous().reshape(-1)
    squares = 0.0
    for chunk in flat.split(_NORM_CHUNK):
        squares += float(torch.linalg.vector_norm(chunk.double())) ** 2
    norm = math.sqrt(squares)
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "norm": norm if math.isfinite(norm) else str(norm),
        "sha256": hashlib.sha256(flat.view(torch.uint8).cpu().numpy()).hexdigest(),
    }


def unwrap(chunk):
    """The model inside the stacks' wrappers (megatron-core's DDP, Float16Module, FSDP), as both stacks unwrap it."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def module_names(model) -> dict:
    """Every module of an unwrapped model chunk -> its name, with each `layers.<i>` given the layer's global index
    (`layer_number - 1`): on a pipeline stage the local index restarts at 0, so the same layer would get another
    name under another pipeline split."""
    renamed = {}
    for name, module in model.named_modules():
        m = _LAYER.match(name)
        number = getattr(module, "layer_number", None)
        if m and isinstance(number, int):
            renamed[name] = f"{m.group(1) or ''}layers.{number - 1}"
    out = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest renamed prefix
            prefix = ".".join(parts[:i])
            if prefix in renamed:
                name = ".".join([renamed[prefix], *parts[i:]])
                break
        out[module] = name or ROOT
    return out


def _parameter_name(module_name: str, leaf: str) -> str:
    return leaf if module_name == ROOT else f"{module_name}.{leaf}"


def _ranks() -> tuple[int, int]:
    """(global rank, pipeline rank); (0, 0) outside a process group or megatron's model-parallel state."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    try:
        from megatron.core import parallel_state

        pp_rank = (
            parallel_state.get_pipeline_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        )
    except (ImportError, AssertionError, RuntimeError):
        pp_rank = 0
    return rank, pp_rank


class Recorder:
    """Records one job's first training iteration into `run_dir`: attach it to the model chunks and the optimizer
    once the stack has built them; it writes and detaches itself when that optimizer's first step begins (the end
    of iteration 1's forward and backward passes)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.records: list[dict] = []
        self.chunks: list = []
        self._handles: list = []
        self._microbatch: dict[int, int] = {}  # chunk -> micro-batches begun
        self._calls: dict[tuple, int] = {}  # (chunk, name, micro-batch) -> calls so far
        self._finished: dict[int, dict] = {}  # chunk -> {module: None}, in the order of their first output
        self.written: str | None = None

    def attach(self, model, optimizer=None) -> None:
        """`model`: the stack's list of model chunks (wrapped or not). With `optimizer`, the records are written
        as its first step begins; without one, call `finish` after the backward pass."""
        self.rank, self.pp_rank = _ranks()
        self.chunks = [unwrap(c) for c in (model if isinstance(model, (list, tuple)) else [model])]
        for index, chunk in enumerate(self.chunks):
            self._handles.append(chunk.register_forward_pre_hook(self._begin_microbatch(index)))
            for module, name in module_names(chunk).items():
                self._handles.append(module.register_forward_hook(self._output(index, name)))
            self._finished[index] = {}
        if optimizer is not None:
            first_step, own = optimizer.step, "step" in vars(optimizer)

            def step(*args, **kwargs):
                if own:  # a step the stack set on the instance (e.g. a CUDA-graphed one) is put back
                    optimizer.step = first_step
                else:
                    del optimizer.step  # the class's step is back
                self.finish()
                return first_step(*args, **kwargs)

            optimizer.step = step

    def _begin_microbatch(self, chunk: int):
        def hook(module, args):
            self._microbatch[chunk] = self._microbatch.get(chunk, 0) + 1

        return hook

    def _output(self, chunk: int, name: str):
        def hook(module, args, output):
            self._finished[chunk].setdefault(module)
            tensor = first_tensor(output)
            if tensor is None:  # e.g. a bias-dropout-add placeholder, which returns a function
                return
            microbatch = self._microbatch.get(chunk, 1) - 1
            key = (chunk, name, microbatch)
            call = self._calls.get(key, 0)
            self._calls[key] = call + 1
            self.records.append(
                {
                    "kind": "output",
                    "name": name,
                    "microbatch": microbatch,
                    "call": call,
                    **self._where(chunk),
                    **describe(tensor),
                }
            )

        return hook

    def _where(self, chunk: int) -> dict:
        return {"rank": self.rank, "pp_rank": self.pp_rank, "chunk": chunk}

    def record_gradients(self) -> None:
        """Every parameter's gradient: megatron DDP's `main_grad` (the gradient buffer, reduced over data-parallel
        ranks), else `.grad`. In the order backward produces them: the last chunk first, and in a chunk the modules
        in the reverse of the order their forward finished (registration order is not that: an attention block
        registers its output projection before its QKV projection), a module's last parameter first; modules that
        never ran come last."""
        for index in reversed(range(len(self.chunks))):
            names = module_names(self.chunks[index])
            ran = list(self._finished.get(index, {}))
            order = [*reversed(ran), *(m for m in reversed(names) if m not in self._finished.get(index, {}))]
            params, seen = [], set()
            for module in order:
                module_name = names[module]
                for leaf, param in reversed(list(module.named_parameters(recurse=False))):
                    if id(param) not in seen:  # a shared parameter under one name only
                        seen.add(id(param))
                        params.append((_parameter_name(module_name, leaf), param))
            for name, param in params:
                record = {"kind": "grad", "name": name, **self._where(index)}
                grad, source = getattr(param, "main_grad", None), "main_grad"
                if grad is None:
                    grad, source = param.grad, "grad"
                self.records.append({**record, "source": source, **describe(grad)} if grad is not None else record)

    def finish(self) -> str | None:
        """Stop recording, add the gradients and write this rank's file (once); returns its path."""
        if self.written is not None:
            return self.written
        self.detach()
        self.record_gradients()
        self.written = rundir.write_numerics(self.run_dir, self.rank, self.records)
        return self.written

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
