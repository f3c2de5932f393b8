"""The stacks driven natively, without unified_train's launcher, hooks or metrics sink: the baseline of
scripts/benchmark.py.

    python scripts/native_baseline.py bridge [unified overrides...]
    python scripts/native_baseline.py mlm    [unified overrides...]

bridge: Bridge's own recipe (`vanilla_gpt_pretrain_config`) with the run_recipe.py overrides that
        `mode=export` prints, the local layer spec set in code (no Transformer Engine), and
        `pretrain(cfg, forward_step)`.
Both run the stacks' own core attention without TE (megatron-core's DotProductAttention): kernels.attention=local
is forced, whatever the overrides say, since that is what the native stacks do.
mlm:    MLM's `megatron.training.pretrain` on the exported flags, parsed by MLM's own parser. The megatron-core
        wheel ships no pretrain_gpt.py, so the GPT glue (forward step, dataset provider) is the one
        unified_train uses; what is left out is everything else unified_train adds around the loop.
The unified overrides only pick the flags; this process imports nothing of unified_train at run time except
the translation (done before the stack starts) and, for mlm, the glue functions.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from unittest import mock


def main() -> None:
    backend, overrides = sys.argv[1], sys.argv[2:]
    from unified_train import checks, resources, rundir
    from unified_train.compose import compose
    from unified_train.runtime import env, ranks

    cfg = compose([f"backend={backend}", *overrides, "kernels.attention=local"])
    problems = checks.check(cfg)
    if problems:
        sys.exit("\n".join(problems))
    os.environ.update(env.process_env(cfg))
    env.pin_compiler_determinism()
    job = rundir.identity(
        cfg, world_size=resources.world_size(cfg), run_dir=tempfile.mkdtemp(prefix=f"native_{backend}_")
    )
    ranks.init_process_group(job.world_size)
    if backend == "bridge":
        _bridge(cfg, job)
    else:
        _mlm(cfg, job)


def _bridge(cfg, job) -> None:
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.bridge.recipes.gpt.vanilla_gpt import vanilla_gpt_pretrain_config
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    from unified_train import backends, rundir
    from unified_train.backends import bridge

    native = backends.get("bridge").native_config(cfg, job)
    recipe = vanilla_gpt_pretrain_config()
    process_config_with_overrides(recipe, cli_overrides=bridge.run_recipe_overrides(native))
    recipe.model.transformer_layer_spec = local_layer_spec  # what run_recipe users must do without TE
    recipe.checkpoint.save = job.subdir(rundir.CHECKPOINTS) if cfg.checkpoint.save else None
    recipe.logger.tensorboard_dir = job.subdir(rundir.TENSORBOARD)
    recipe.env_vars = {}
    _pretrain_called()
    pretrain(recipe, forward_step)


def _mlm(cfg, job) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from unified_train.backends.mlm import glue
    from unified_train.backends.mlm.argv import build_argv

    argv = build_argv(cfg, job)
    with mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]):
        args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
        container = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
        training.set_startup_timestamps(program_start=time.time(), main_entry=time.time())
        _pretrain_called()
        training.pretrain(
            container,
            glue.datasets_provider(),
            ModelType.encoder_or_decoder,
            glue.forward_step,
            get_embedding_ranks=glue.embedding_ranks,
        )


def _pretrain_called() -> None:
    """The line scripts/benchmark.py reads for the start-up split, as unified_train prints it."""
    from unified_train.results.metrics import pretrain_called_line

    print(pretrain_called_line("native_baseline"), flush=True)


if __name__ == "__main__":
    main()
