"""Megatron-LM backend: `megatron.training.pretrain` in-process, with our own GPT glue (glue.py) standing in for
upstream's `pretrain_gpt.py`, which the megatron-core wheel does not ship."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from unittest import mock

from unified_train import compat, config
from unified_train.backends import numerics, process_state
from unified_train.backends.describe import (
    CHECKPOINT_FIELDS,
    DATASET_FIELDS,
    GPT_FIELDS,
    RERUN_FIELDS,
    dataclass_fields,
    flatten,
    plain,
    schedule_trace,
)
from unified_train.backends.mlm import glue
from unified_train.backends.mlm.argv import NAME, build_argv, parse_and_validate
from unified_train.rundir import JobIdentity


@dataclass
class Native:
    argv: list[str]
    args: argparse.Namespace  # after MLM's parse_args + validate_args
    world_size: int
    rope_scaling_factor: float
    # MLM has no flag for a separate data-shuffle seed (pretrain_gpt.py shuffles with --seed); our dataset glue
    # takes it from here so data.seed works on both backends.
    data_seed: int
    numerics_dir: str | None = None  # mode=numerics: record iteration 1 into this run directory


def model_config(native: Native):
    """The GPTModelConfig `pretrain_gpt.py` builds. MLM 0.19.2 ignores --rope-scaling-factor here (it keeps the
    dataclass default 8.0), so we carry the unified value across explicitly."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.argument_utils import gpt_config_from_args

    if getattr(native.args, "padded_vocab_size", None) is None:
        with process_state.quiet():
            build_tokenizer(native.args)  # sets args.padded_vocab_size
    model_cfg = gpt_config_from_args(native.args)
    model_cfg.rope_scaling_factor = native.rope_scaling_factor
    return model_cfg


_DATASET_FIELDS = ("sequence_length", *DATASET_FIELDS)


class MLMBackend:
    name = NAME

    def native_config(self, cfg, job: JobIdentity) -> Native:
        compat.install()
        argv = build_argv(cfg, job)
        args = parse_and_validate(argv, job.world_size)
        return Native(
            argv=argv,
            args=args,
            world_size=job.world_size,
            rope_scaling_factor=cfg.model.rope_scaling_factor,
            data_seed=config.data_seed(cfg),
            numerics_dir=job.run_dir if cfg.mode == "numerics" else None,
        )

    def describe(self, native: Native) -> dict[str, object]:
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from megatron.training import global_vars
        from megatron.training.models.gpt import default_layer_spec
        from megatron.training.training import (
            get_megatron_ddp_config,
            get_megatron_optimizer_config,
            get_optimizer_param_scheduler,
        )

        from unified_train.kernels.spec import described_core_attention

        args = native.args
        model_cfg = model_config(native)
        out = flatten("transformer", model_cfg.transformer, dataclass_fields(type(model_cfg.transformer)))
        out.update(flatten("gpt", model_cfg, GPT_FIELDS))
        out["gpt.vocab_size"] = args.padded_vocab_size
        build_spec = model_cfg.transformer_layer_spec or default_layer_spec  # what MLM's model builder calls
        out["kernels.core_attention"] = plain(described_core_attention(build_spec, model_cfg))
        out.update(flatten("optimizer", get_megatron_optimizer_config(args)[0], dataclass_fields(OptimizerConfig)))
        out.update(flatten("ddp", get_megatron_ddp_config(args), dataclass_fields(DistributedDataParallelConfig)))
        out.update(flatten("dataset", glue.dataset_config(args, native.data_seed), _DATASET_FIELDS))
        out.update(
            {
                "train.train_iters": args.train_iters,
                "train.micro_batch_size": args.micro_batch_size,
                "train.global_batch_size": args.global_batch_size,
                "train.seq_length": args.seq_length,
                "validation.eval_interval": args.eval_interval,
                "validation.eval_iters": args.eval_iters,
                "rng.seed": args.seed,
                "rng.data_parallel_random_init": args.data_parallel_random_init,
                "tokenizer.tokenizer_type": args.tokenizer_type,
                "tokenizer.vocab_size": args.vocab_size,
                "data.dataloader_type": args.dataloader_type,
                "data.data_sharding": args.data_sharding,
                "data.num_workers": args.num_workers,
                "checkpoint.load_rng": not args.no_load_rng,
                "checkpoint.load_optim": not args.no_load_optim,
                "train.exit_signal_handler": args.exit_signal_handler,
                "train.exit_signal": args.exit_signal.name,
            }
        )
        out.update({f"checkpoint.{f}": getattr(args, f) for f in CHECKPOINT_FIELDS})
        # One MLM flag checks both the loss and the gradients for NaN.
        rerun = dict(vars(args), check_for_nan_in_loss=args.check_for_nan_in_loss_and_grad)
        out.update({f"rerun.{f}": rerun[f] for f in RERUN_FIELDS})

        def make_scheduler(optimizer):
            previous = global_vars._GLOBAL_ARGS
            global_vars._GLOBAL_ARGS = argparse.Namespace(**vars(args))  # the scheduler builder reads global args
            try:
                return get_optimizer_param_scheduler(optimizer)
            finally:
                global_vars._GLOBAL_ARGS = previous

        out.update(schedule_trace(make_scheduler, args.train_iters, args.global_batch_size))
        return out

    def export(self, native: Native) -> list[str]:
        """The upstream invocation: Megatron-LM's pretrain_gpt.py under torchrun with the same flags.
        (Upstream shuffles data with --seed; a data.seed different from rng.seed has no upstream flag.)"""
        return ["torchrun", f"--nproc-per-node={native.world_size}", "pretrain_gpt.py", *native.argv]

    def export_code(self, native: Native) -> list[str]:
        """Every setting travels as a flag. The flex/sdpa layer spec is `--spec unified_train.kernels.spec FN`,
        which upstream's pretrain_gpt.py can import only where unified_train is installed."""
        return []

    def write_native(self, native: Native, directory: str) -> None:
        """MLM's native config: the flag list (one per line) and the equivalent upstream command."""
        with open(os.path.join(directory, "mlm_args.txt"), "w") as f:
            f.write("\n".join(native.argv) + "\n")
        with open(os.path.join(directory, "mlm_command.sh"), "w") as f:
            f.write(shlex.join(self.export(native)) + "\n")

    def train(self, native: Native, sink) -> None:
        """Run MLM's real `pretrain` in this process, feeding `sink` from hooks on MLM's own functions."""
        import torch
        from megatron.core.enums import ModelType
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
        from megatron.training import training
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.global_vars import set_global_variables
        from megatron.training.training import num_floating_point_operations

        args = native.args
        with process_state.quiet():
            set_global_variables(args)  # builds the tokenizer (padded vocab), microbatch calculator, writers
        container = pretrain_cfg_container_from_args(args, model_config(native))
        sink.set_flops_per_iteration(num_floating_point_operations(args, args.global_batch_size))

        original_train_step, original_evaluate = training.train_step, training.evaluate
        original_eval_print = training.evaluate_and_print_results
        eval_context = {"prefix": ""}

        def timed_train_step(*a, **kw):
            start = time.perf_counter()
            result = original_train_step(*a, **kw)
            loss_dict, grad_norm = result[0], result[5]
            torch.cuda.synchronize()
            iteration = training.get_args().curr_iteration + 1
            loss = loss_dict.get("lm loss") if loss_dict else None
            lr = get_canonical_lr_for_logging(optimizer[0].param_groups) if optimizer else None
            sink.record_train(
                iteration, None if loss is None else float(loss), grad_norm, lr, time.perf_counter() - start
            )
            return result

        def tracked_eval_print(prefix, *a, **kw):
            eval_context["prefix"] = prefix
            return original_eval_print(prefix, *a, **kw)

        def tracked_evaluate(*a, **kw):
            result = original_evaluate(*a, **kw)
            losses = result[0] or {}
            if "lm loss" in losses:
                prefix = eval_context["prefix"]
                kind = "test" if "test set" in prefix else "final_valid" if "validation set" in prefix else "valid"
                sink.record_eval(kind, float(losses["lm loss"]))
            return result

        optimizer: list = []  # MLM builds it inside pretrain; captured for the learning rate we record
        original_setup = training.setup_model_and_optimizer
        recorder = numerics.Recorder(native.numerics_dir) if native.numerics_dir else None

        def capture_optimizer(*a, **kw):
            result = original_setup(*a, **kw)
            optimizer.append(result[1])
            if recorder is not None:  # the model chunks and the optimizer whose first step ends iteration 1
                recorder.attach(result[0], result[1])
            sink.training_started()
            return result

        patches = [
            mock.patch.object(training, "train_step", timed_train_step),
            mock.patch.object(training, "evaluate", tracked_evaluate),
            mock.patch.object(training, "evaluate_and_print_results", tracked_eval_print),
            mock.patch.object(training, "setup_model_and_optimizer", capture_optimizer),
            # ft_integration re-parses sys.argv: show it our flags, not Hydra's.
            mock.patch.object(sys, "argv", ["pretrain_gpt.py", *native.argv]),
        ]
        for p in patches:
            p.start()
        try:
            training.set_startup_timestamps(program_start=time.time(), main_entry=time.time())
            training.pretrain(
                container,
                glue.datasets_provider(native.data_seed),
                ModelType.encoder_or_decoder,
                glue.forward_step,
                get_embedding_ranks=glue.embedding_ranks,
            )
        except SystemExit as exc:  # exit-interval / signal paths end the loop with SystemExit
            if exc.code not in (0, None):
                raise
        finally:
            for p in reversed(patches):
                p.stop()
            if recorder is not None:
                recorder.detach()  # a run that ended before its first step leaves no hooks behind
            del container

    def teardown(self) -> None:
        """Drop every global MLM's pretrain leaves behind, keeping the world process group."""
        from megatron.training import global_vars
        from megatron.training.training import destroy_global_state

        writer = global_vars._GLOBAL_TENSORBOARD_WRITER
        if writer is not None:
            writer.flush()
            writer.close()
        if global_vars._GLOBAL_SIGNAL_HANDLER is not None:
            global_vars._GLOBAL_SIGNAL_HANDLER.release()
        destroy_global_state()
        process_state.release_process_state()


ADAPTER = MLMBackend()
