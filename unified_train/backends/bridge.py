"""Megatron-Bridge backend: `megatron.bridge.training.pretrain.pretrain` in-process with Bridge's GPT step.

The ConfigContainer is built directly in Python (the shape of Bridge's `vanilla_gpt_pretrain_config`), from the
same megatron-core field values the MLM adapter turns into flags, then passed through Bridge's own
`runtime_config_update` (mixed-precision resolution and validation). A fresh container is built for every run:
Bridge's setup mutates it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from unified_train import compat, mcore_fields
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
from unified_train.rundir import JobIdentity

NAME = "bridge"

_PRECISION_PRESET = {"bf16": "bf16_mixed", "fp16": "fp16_mixed", "fp32": None}


@dataclass
class Native:
    container: object  # megatron.bridge.training.config.ConfigContainer, after runtime_config_update
    world_size: int
    overrides: list[str]
    numerics_dir: str | None = None  # mode=numerics: record iteration 1 into this run directory


def _model_provider(cfg, job: JobIdentity):
    import torch.nn.functional as F
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.models.mla_provider import MLAModelProvider

    from unified_train.kernels import spec

    fields = mcore_fields.transformer(cfg)
    fields["activation_func"] = {"gelu": F.gelu, "silu": F.silu}[fields.pop("activation")]
    vpp = fields.pop("virtual_pipeline_model_parallel_size")
    gpt = mcore_fields.gpt(cfg)
    gpt.pop("vocab_size")  # Bridge takes it from the tokenizer and pads it like MLM (calculate_padded_vocab_size)
    cls = MLAModelProvider if fields.get("multi_latent_attention") else GPTModelProvider
    provider = cls(**fields, **gpt, virtual_pipeline_model_parallel_size=vpp)
    # The same spec function MLM gets through --spec: MLM's own spec selection (dense or MoE block, MLA), with
    # the unified core attention. Bridge's `local_layer_spec` ignores MLA and the dense/MoE layer pattern.
    provider.transformer_layer_spec = spec.SPEC_FUNCTIONS[job.attention]
    if cfg.precision.dtype == "fp32":
        import torch

        # MLM sets pipeline_dtype = params_dtype; Bridge's presets do the same, but fp32 has no preset.
        provider.pipeline_dtype = torch.float32
    return provider


def build_container(cfg, job: JobIdentity):
    """A ConfigContainer equivalent to the unified config (before runtime_config_update)."""
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedInitConfig,
        GPTDatasetConfig,
        LoggerConfig,
        OptimizerConfig,
        RerunStateMachineConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.distributed import DistributedDataParallelConfig

    data = mcore_fields.dataset(cfg)
    blend = None if data["mock"] else get_blend_from_list(data["data_path"])
    optim = mcore_fields.optimizer(cfg)
    dtype = cfg.precision.dtype
    tok = mcore_fields.tokenizer(cfg)
    container = ConfigContainer(
        model=_model_provider(cfg, job),
        train=TrainingConfig(**mcore_fields.training(cfg)),
        rerun_state_machine=RerunStateMachineConfig(**mcore_fields.rerun(cfg)),
        validation=ValidationConfig(**mcore_fields.validation(cfg)),
        optimizer=OptimizerConfig(**optim, bf16=dtype == "bf16", fp16=dtype == "fp16"),
        scheduler=SchedulerConfig(**mcore_fields.scheduler(cfg)),
        ddp=DistributedDataParallelConfig(**mcore_fields.ddp(cfg)),
        dataset=GPTDatasetConfig(
            random_seed=data["random_seed"],
            seq_length=data["sequence_length"],
            blend=blend,
            blend_per_split=None,
            split=data["split"],
            dataloader_type=data["dataloader_type"],
            num_workers=data["num_workers"],
            reset_position_ids=data["reset_position_ids"],
            reset_attention_mask=data["reset_attention_mask"],
            eod_mask_loss=data["eod_mask_loss"],
            # Bridge's GPT step drops the dataloader mask anyway (skip_getting_attention_mask_from_dataset).
            create_attention_mask=False,
        ),
        logger=LoggerConfig(
            **mcore_fields.logger(cfg, job),
            filter_warnings=False,  # the default filter silences WARNING on every existing logger, ours too
        ),
        tokenizer=TokenizerConfig(
            tokenizer_type=tok["tokenizer_type"], vocab_size=tok["vocab_size"], tokenizer_model=tok["tokenizer_model"]
        ),
        checkpoint=CheckpointConfig(**mcore_fields.checkpoint(cfg, job)),
        rng=RNGConfig(**mcore_fields.rng(cfg)),
        dist=DistributedInitConfig(),
        mixed_precision=_mixed_precision(cfg),
    )
    container.env_vars = {}  # the launcher owns the process environment, identically for both backends
    return container


def _mixed_precision(cfg):
    """Bridge's preset for the dtype, with the gradient reduction dtype of the unified config, as MLM's flags have
    it (the fp16 preset would reduce in fp16; tests/test_parity.py's sweep holds this)."""
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    name = _PRECISION_PRESET[cfg.precision.dtype]
    if name is None:
        return None
    preset = get_mixed_precision_config(name)
    preset.grad_reduce_in_fp32 = mcore_fields.ddp(cfg)["grad_reduce_in_fp32"]
    return preset


def _apply_overrides(container, overrides: list[str]) -> None:
    if overrides:
        from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

        process_config_with_overrides(container, cli_overrides=list(overrides))


def _embedding_rows(c) -> int:
    """The vocabulary Bridge's setup gives the model: the tokenizer's own (a HuggingFace tokenizer ignores the
    unified model.vocab_size), padded like MLM's when it came from the tokenizer (setup's
    _validate_and_set_vocab_size, then GPTModelProvider.provide)."""
    from megatron.bridge.training.setup import _validate_and_set_vocab_size
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    with process_state.quiet():
        tokenizer = build_tokenizer(c.tokenizer)
    vocab, pad = _validate_and_set_vocab_size(
        c.model.vocab_size, tokenizer.vocab_size, c.tokenizer.use_tokenizer_vocab_size
    )
    if not pad:
        return vocab
    return calculate_padded_vocab_size(
        vocab, c.model.make_vocab_size_divisible_by, c.model.tensor_model_parallel_size, logging_enabled=False
    )


def run_recipe_overrides(native: Native) -> list[str]:
    """`key=value` overrides for Bridge's scripts/training/run_recipe.py on vanilla_gpt_pretrain_config that
    reproduce this container (as far as Hydra overrides can: the layer spec is Python-only)."""
    c = native.container
    m = c.model
    out = []
    for key, value in mcore_fields_snapshot(native).items():
        out.append(f"{key}={value}")
    out.append(f"dataset.seq_length={c.dataset.seq_length}")
    out.append(f"model.seq_length={m.seq_length}")
    return out


def mcore_fields_snapshot(native: Native) -> dict[str, object]:
    """The Bridge-side values of every translated knob, as `section.field` keys."""
    c = native.container
    out = {}
    for section, obj, keys in (
        ("model", c.model, _MODEL_OVERRIDE_KEYS),
        ("train", c.train, ("train_iters", "micro_batch_size", "global_batch_size")),
        ("validation", c.validation, ("eval_interval", "eval_iters")),
        (
            "optimizer",
            c.optimizer,
            (
                "lr",
                "min_lr",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_eps",
                "clip_grad",
                "use_distributed_optimizer",
            ),
        ),
        (
            "scheduler",
            c.scheduler,
            (
                "lr_decay_style",
                "lr_warmup_iters",
                "lr_decay_iters",
                "lr_warmup_init",
                "start_weight_decay",
                "end_weight_decay",
            ),
        ),
        ("rerun_state_machine", c.rerun_state_machine, RERUN_FIELDS),
        ("ddp", c.ddp, ("use_distributed_optimizer",)),
        ("dataset", c.dataset, ("random_seed", "dataloader_type")),
        ("tokenizer", c.tokenizer, ("tokenizer_type", "vocab_size")),
        ("rng", c.rng, ("seed",)),
        ("logger", c.logger, ("log_interval",)),
    ):
        for key in keys:
            value = getattr(obj, key, None)
            if value is None:
                continue
            if key == "activation_func":
                value = value.__name__
            out[f"{section}.{key}"] = value
    return out


_MODEL_OVERRIDE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "kv_channels",
    "normalization",
    "layernorm_epsilon",
    "gated_linear_unit",
    "activation_func",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "sequence_parallel",
    "transformer_impl",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
    "cross_entropy_fusion_impl",
    "attention_softmax_in_fp32",
    "apply_rope_fusion",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rope_scaling",
    "rope_scaling_factor",
    "share_embeddings_and_output_weights",
    "make_vocab_size_divisible_by",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "deterministic_mode",
)


class BridgeBackend:
    name = NAME

    def native_config(self, cfg, job: JobIdentity) -> Native:
        compat.install()
        from megatron.bridge.training.config import runtime_config_update

        container = build_container(cfg, job)
        extra = list(cfg.backend.extra) if cfg.backend.name == NAME else []
        _apply_overrides(container, extra)
        with process_state.world(job.world_size), process_state.quiet():
            runtime_config_update(container)
        numerics_dir = job.run_dir if cfg.mode == "numerics" else None
        return Native(container=container, world_size=job.world_size, overrides=extra, numerics_dir=numerics_dir)

    def describe(self, native: Native) -> dict[str, object]:
        from megatron.bridge.training.optim import _get_scheduler
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.transformer import MLATransformerConfig, TransformerConfig

        from unified_train.kernels.spec import described_core_attention

        c = native.container
        m = c.model
        tc_cls = MLATransformerConfig if isinstance(m, MLATransformerConfig) else TransformerConfig
        out = flatten("transformer", m, dataclass_fields(tc_cls))
        out.update(flatten("gpt", m, GPT_FIELDS))
        out["gpt.vocab_size"] = _embedding_rows(c)
        out["kernels.core_attention"] = plain(described_core_attention(m.transformer_layer_spec, m))
        out.update(flatten("optimizer", c.optimizer, dataclass_fields(OptimizerConfig)))
        out.update(flatten("ddp", c.ddp, dataclass_fields(DistributedDataParallelConfig)))
        out.update(flatten("dataset", c.dataset, DATASET_FIELDS))
        out["dataset.sequence_length"] = c.dataset.seq_length
        out.update(
            {
                "train.train_iters": c.train.train_iters,
                "train.micro_batch_size": c.train.micro_batch_size,
                "train.global_batch_size": c.train.global_batch_size,
                "train.seq_length": c.dataset.seq_length,
                "validation.eval_interval": c.validation.eval_interval,
                "validation.eval_iters": c.validation.eval_iters,
                "rng.seed": c.rng.seed,
                "rng.data_parallel_random_init": c.rng.data_parallel_random_init,
                "tokenizer.tokenizer_type": c.tokenizer.tokenizer_type,
                "tokenizer.vocab_size": c.tokenizer.vocab_size,
                "data.dataloader_type": c.dataset.dataloader_type,
                "data.data_sharding": c.dataset.data_sharding,
                "data.num_workers": c.dataset.num_workers,
                "train.exit_signal_handler": c.train.exit_signal_handler,
                "train.exit_signal": c.train.exit_signal.name,
            }
        )
        out.update(flatten("checkpoint", c.checkpoint, (*CHECKPOINT_FIELDS, "load_rng", "load_optim")))
        out.update(flatten("rerun", c.rerun_state_machine, RERUN_FIELDS))
        out.update(
            schedule_trace(
                lambda opt: _get_scheduler(c.optimizer, c.scheduler, opt),
                c.train.train_iters,
                c.train.global_batch_size,
            )
        )
        return out

    def export(self, native: Native) -> list[str]:
        """The upstream invocation: Bridge's run_recipe.py with Hydra-style overrides."""
        return [
            "torchrun",
            f"--nproc-per-node={native.world_size}",
            "scripts/training/run_recipe.py",
            "--recipe",
            "vanilla_gpt_pretrain_config",
            *run_recipe_overrides(native),
            *native.overrides,
        ]

    def export_code(self, native: Native) -> list[str]:
        """run_recipe.py takes no callable by override: the layer spec is Python on its config (and needs
        unified_train importable there)."""
        fn = native.container.model.transformer_layer_spec
        return [f"from {fn.__module__} import {fn.__qualname__}; cfg.model.transformer_layer_spec = {fn.__qualname__}"]

    def write_native(self, native: Native, directory: str) -> None:
        """Bridge's native config: the ConfigContainer as YAML, and the equivalent run_recipe.py command."""
        import shlex

        native.container.to_yaml(os.path.join(directory, "bridge_config.yaml"))
        with open(os.path.join(directory, "bridge_command.sh"), "w") as f:
            f.writelines(f"# set in the recipe's Python: {line}\n" for line in self.export_code(native))
            f.write(shlex.join(self.export(native)) + "\n")

    def train(self, native: Native, sink) -> None:
        """Run Bridge's real `pretrain` in this process; a callback feeds `sink` every step."""
        import torch
        from megatron.bridge.training.callbacks import Callback
        from megatron.bridge.training.gpt_step import forward_step
        from megatron.bridge.training.pretrain import pretrain
        from megatron.bridge.training.utils import flop_utils
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        c = native.container
        recorder = numerics.Recorder(native.numerics_dir) if native.numerics_dir else None

        class Recorder(Callback):
            def on_train_start(self, ctx):
                # Bridge's FLOP count needs the vocabulary size, which setup takes from the tokenizer.
                sink.set_flops_per_iteration(flop_utils.num_floating_point_operations(c, c.train.global_batch_size))
                _ = ctx.state.wandb_logger  # Bridge starts its W&B run lazily, on first access (last rank only)
                if recorder is not None:  # the model chunks and the optimizer whose first step ends iteration 1
                    recorder.attach(ctx.model, ctx.optimizer)
                sink.training_started()

            def on_train_step_start(self, ctx):
                self.start = time.perf_counter()

            def on_train_step_end(self, ctx):
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - self.start
                loss = (ctx.loss_dict or {}).get("lm loss")
                lr = get_canonical_lr_for_logging(ctx.optimizer.param_groups)
                # Bridge advances train_state.step right after this event.
                sink.record_train(
                    ctx.state.train_state.step + 1, None if loss is None else float(loss), ctx.grad_norm, lr, elapsed
                )

            def on_train_end(self, ctx):
                self.done = True  # evaluations after this are the final validation / test passes

            def on_eval_end(self, ctx):
                self._eval(ctx, "final_valid" if getattr(self, "done", False) else "valid")

            def on_test_end(self, ctx):
                self._eval(ctx, "test")

            def _eval(self, ctx, kind):
                losses = ctx.total_loss_dict or {}
                if "lm loss" in losses:
                    sink.record_eval(kind, float(losses["lm loss"]))

        try:
            pretrain(c, forward_step, callbacks=[Recorder()])
        except SystemExit as exc:  # the exit-signal / exit-interval paths end the loop with SystemExit, as MLM's
            if exc.code not in (0, None):
                raise
        finally:
            if recorder is not None:
                recorder.detach()  # a run that ended before its first step leaves no hooks behind

    def teardown(self) -> None:
        """Bridge destroys its parallel state itself; drop what it leaves (caches, compiled kernels, memory)."""
        from megatron.bridge.training.utils import checkpoint_utils

        for cached in ("read_train_state", "read_run_config"):
            fn = getattr(checkpoint_utils, cached, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
        process_state.release_process_state()


ADAPTER = BridgeBackend()
