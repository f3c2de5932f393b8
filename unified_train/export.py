"""`mode=export`: the equivalent native invocations of one unified config, for both stacks."""

from __future__ import annotations

import shlex

from unified_train import backends, plan


def commands(cfg) -> dict[str, list[str]]:
    from unified_train.launch import job_environment

    world = plan.world_size(cfg)
    out = {}
    with job_environment(cfg):
        for name in backends.NAMES:
            backend = backends.get(name)
            out[name] = backend.export(backend.native_config(cfg, cfg.run_dir, world_size=world))
    return out


def render(cfg) -> str:
    cmds = commands(cfg)
    return "\n".join([
        "# Megatron-LM (pretrain_gpt.py from a Megatron-LM checkout at core_r0.19.0):",
        shlex.join(cmds["mlm"]),
        "",
        "# Megatron-Bridge (scripts/training/run_recipe.py from a Megatron-Bridge checkout at r0.6.0); the local",
        "# layer spec cannot be set by an override, so without Transformer Engine run_recipe needs it set in code:",
        shlex.join(cmds["bridge"]),
    ])
