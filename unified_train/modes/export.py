"""`mode=export`: the equivalent native invocations of one unified config, for both stacks."""

from __future__ import annotations

import shlex

from unified_train import rundir
from unified_train.modes import parity

_UPSTREAM = {
    "mlm": "Megatron-LM (pretrain_gpt.py from a Megatron-LM checkout at core_r0.19.0)",
    "bridge": "Megatron-Bridge (scripts/training/run_recipe.py from a Megatron-Bridge checkout at r0.6.0)",
}


def commands(cfg, job: rundir.JobIdentity) -> dict[str, list[str]]:
    return {name: backend.export(native) for name, (backend, native) in parity.natives(cfg, job).items()}


def render(cfg, job: rundir.JobIdentity) -> str:
    """Both commands, each under a comment naming the upstream script and any Python it needs besides flags."""
    blocks = []
    for name, (backend, native) in parity.natives(cfg, job).items():
        code = [f"#   and in its Python: {line}" for line in backend.export_code(native)]
        blocks.append("\n".join([f"# {_UPSTREAM[name]}:", *code, shlex.join(backend.export(native))]))
    return "\n\n".join(blocks)
