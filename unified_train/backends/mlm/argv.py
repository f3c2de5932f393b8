"""The unified config as MLM's command line: `pretrain_gpt.py` flags, parsed and validated by MLM's own parser."""

from __future__ import annotations

import argparse
import contextlib
import enum
import sys
from unittest import mock

from unified_train import mcore_fields
from unified_train.backends import process_state
from unified_train.rundir import JobIdentity

NAME = "mlm"

# TransformerConfig / GPT fields whose MLM argparse destination has another name or meaning.
_NEGATED_DESTS = {"persist_layer_norm": "no_persist_layer_norm"}
_RENAMED_DESTS = {"num_moe_experts": "num_experts", "rope_scaling": "use_rope_scaling"}
# Fields expressed by other flags (activation) or not MLM flags at all (GPT-level, handled explicitly).
_SPECIAL = {
    "activation",
    "gated_linear_unit",
    "bias_activation_fusion",
    "num_query_groups",
    "moe_layer_freq",
    "seq_length",
    "share_embeddings_and_output_weights",
    "vocab_size",
    "sequence_length",
    "mock",
    "data_path",
    "random_seed",
    "rope_scaling_factor",
    "tokenizer_type",
    "tokenizer_model",
    "virtual_pipeline_model_parallel_size",
    "optimizer",
    # Set by core_transformer_config_from_args itself, to the values mcore_fields pins for Bridge.
    "inference_sampling_seed",
    "deallocate_pipeline_outputs",
    "batch_p2p_comm",
}


def _parser() -> argparse.ArgumentParser:
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    return parser


def _flag(actions: dict, dest: str, value) -> list[str]:
    """The argv tokens that make MLM's parser set `dest` to `value` (nothing when it is the default)."""
    action = actions[dest]
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(action, argparse._StoreFalseAction):
        return [] if value else [flag]
    if value is None:
        if action.default is not None:
            raise ValueError(f"MLM flag {flag} cannot be unset (default {action.default!r})")
        return []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)] if value else []
    if isinstance(value, enum.Enum):  # e.g. --exit-signal SIGUSR2
        return [] if value == action.default else [flag, value.name]
    return [flag, str(value)]


def build_argv(cfg, job: JobIdentity) -> list[str]:
    """Translate the unified config into MLM flags. Every parity-relevant knob is passed explicitly."""
    actions = {a.dest: a for a in _parser()._actions}
    values: dict[str, object] = {}

    tf = mcore_fields.transformer(cfg)
    for key, value in tf.items():
        if key in _SPECIAL:
            continue
        if key in _NEGATED_DESTS:
            values[_NEGATED_DESTS[key]] = not value
        else:
            values[_RENAMED_DESTS.get(key, key)] = value
    swiglu = tf["activation"] == "silu"
    values["swiglu"] = swiglu
    # MLM keeps one fusion flag per activation; core_transformer_config_from_args picks the matching one.
    values["bias_swiglu_fusion" if swiglu else "bias_gelu_fusion"] = tf["bias_activation_fusion"]
    values["group_query_attention"] = tf["num_query_groups"] != tf["num_attention_heads"]
    values["num_query_groups"] = tf["num_query_groups"]
    if tf.get("moe_layer_freq") is not None:
        values["moe_layer_freq"] = "[" + ",".join(map(str, tf["moe_layer_freq"])) + "]"
    if job.attention in ("flex", "sdpa"):
        # MLM imports MODULE.FUNCTION into GPTModelConfig.transformer_layer_spec; without --spec it builds its
        # default spec, which is what kernels.spec's local choice builds too.
        from unified_train.kernels import spec

        values["spec"] = [spec.__name__, spec.SPEC_FUNCTIONS[job.attention].__name__]
    if cfg.parallel.vpp is not None:
        values["num_layers_per_virtual_pipeline_stage"] = cfg.model.num_layers // (cfg.parallel.pp * cfg.parallel.vpp)

    gpt = mcore_fields.gpt(cfg)
    values.update(
        max_position_embeddings=gpt["seq_length"],
        position_embedding_type=gpt["position_embedding_type"],
        rotary_base=gpt["rotary_base"],
        rotary_percent=gpt["rotary_percent"],
        use_rope_scaling=gpt["rope_scaling"],
        make_vocab_size_divisible_by=gpt["make_vocab_size_divisible_by"],
        untie_embeddings_and_output_weights=not gpt["share_embeddings_and_output_weights"],
    )
    tok = mcore_fields.tokenizer(cfg)
    values.update(
        tokenizer_type=tok["tokenizer_type"], vocab_size=tok["vocab_size"], tokenizer_model=tok["tokenizer_model"]
    )

    values.update(mcore_fields.training(cfg))
    rerun = mcore_fields.rerun(cfg)
    values.update(rerun_mode=rerun["rerun_mode"], check_for_spiky_loss=rerun["check_for_spiky_loss"])
    values.update(mcore_fields.validation(cfg))
    values.update({k: v for k, v in mcore_fields.optimizer(cfg).items() if k != "optimizer"})
    values["optimizer"] = cfg.optim.name
    sched = mcore_fields.scheduler(cfg)
    # MLM derives start = end = --weight-decay for the constant style and asserts they are not given.
    values.update({k: v for k, v in sched.items() if k not in ("start_weight_decay", "end_weight_decay")})
    ddp = mcore_fields.ddp(cfg)
    values.update(mcore_fields.PINNED_DDP)
    values.update(
        use_distributed_optimizer=ddp["use_distributed_optimizer"],
        accumulate_allreduce_grads_in_fp32=ddp["grad_reduce_in_fp32"],
        overlap_grad_reduce=ddp["overlap_grad_reduce"],
        overlap_param_gather=ddp["overlap_param_gather"],
        align_param_gather=ddp["align_param_gather"],
        check_for_nan_in_loss_and_grad=ddp["check_for_nan_in_grad"],  # and rerun's check_for_nan_in_loss
    )
    data = mcore_fields.dataset(cfg)
    values.update(
        seq_length=data["sequence_length"],
        seed=cfg.rng.seed,
        mock_data=data["mock"],
        num_workers=data["num_workers"],
        dataloader_type=data["dataloader_type"],
        reset_position_ids=data["reset_position_ids"],
        reset_attention_mask=data["reset_attention_mask"],
        eod_mask_loss=data["eod_mask_loss"],
        # Bridge's GPT step never feeds the dataloader's causal mask to the model; neither do we.
        create_attention_mask_in_dataloader=False,
    )
    if not data["mock"]:
        values["data_path"] = data["data_path"]
        values["split"] = data["split"]

    dtype = cfg.precision.dtype
    values.update(bf16=dtype == "bf16", fp16=dtype == "fp16")
    values["enable_one_logger"] = False  # one_logger phones home
    values.update(mcore_fields.logger(cfg, job))
    ckpt = mcore_fields.checkpoint(cfg, job)
    if ckpt["save"] is not None:
        values.update(save=ckpt["save"], save_interval=ckpt["save_interval"])
    values["ckpt_format"] = ckpt["ckpt_format"]
    if ckpt["load"] is not None:
        values.update(load=ckpt["load"], ckpt_step=ckpt["ckpt_step"])

    argv: list[str] = []
    for dest, value in values.items():
        argv += _flag(actions, dest, value)
    return argv + (list(cfg.backend.extra) if cfg.backend.name == NAME else [])


def parse_and_validate(argv: list[str], world_size: int) -> argparse.Namespace:
    """MLM's own parse_args + validate_args on `argv`, leaving sys.argv and the environment as they were."""
    import torch
    from megatron.training import arguments

    # validate_args asks the GPU's architecture (TP/CP > 1, grouped GEMM); on a CPU-only machine we validate
    # for Hopper, the architecture these configs target.
    hopper = contextlib.ExitStack()
    if not torch.cuda.is_available():
        hopper.enter_context(mock.patch.object(arguments, "get_device_arch_version", lambda: 9))
        hopper.enter_context(mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)))
    with (
        process_state.world(world_size),
        process_state.quiet(),
        mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
    ):
        with hopper:
            args = arguments.parse_args()
            arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    # The flag is store_true with default None; megatron-core's dataclass (and Bridge) use False. Same behaviour.
    args.use_cpu_initialization = bool(args.use_cpu_initialization)
    return args
