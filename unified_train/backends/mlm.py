"""Megatron-LM backend: `megatron.training.pretrain` in-process, with our own GPT glue.

The wheel ships MLM's loop (`megatron.training`) but not `pretrain_gpt.py`. The glue here (batch fetch, forward
step, token-count loss, dataset provider, embedding ranks) is written to the same contract as upstream's
`pretrain_gpt.py` at core_r0.19.0 so the numerics are those of the native script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass
from functools import partial
from unittest import mock

from unified_train import compat, config, mcore_fields
from unified_train.backends import common

name = "mlm"

# TransformerConfig / GPT fields whose MLM argparse destination has another name or meaning.
_NEGATED_DESTS = {"persist_layer_norm": "no_persist_layer_norm"}
_RENAMED_DESTS = {"num_moe_experts": "num_experts", "rope_scaling": "use_rope_scaling"}
# Fields expressed by other flags (activation) or not MLM flags at all (GPT-level, handled explicitly).
_SPECIAL = {"activation", "gated_linear_unit", "bias_activation_fusion", "num_query_groups", "moe_layer_freq",
            "seq_length", "share_embeddings_and_output_weights", "vocab_size", "sequence_length", "mock",
            "data_path", "random_seed", "rope_scaling_factor", "tokenizer_type", "tokenizer_model",
            "virtual_pipeline_model_parallel_size", "optimizer",
            # Set by core_transformer_config_from_args itself, to the values mcore_fields pins for Bridge.
            "inference_sampling_seed", "deallocate_pipeline_outputs", "batch_p2p_comm"}


@dataclass
class Native:
    argv: list[str]
    args: argparse.Namespace  # after MLM's parse_args + validate_args
    world_size: int
    rope_scaling_factor: float
    # MLM has no flag for a separate data-shuffle seed (pretrain_gpt.py shuffles with --seed); our dataset glue
    # takes it from here so data.seed works on both backends.
    data_seed: int


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
    return [flag, str(value)]


def build_argv(cfg, run_dir: str | None) -> list[str]:
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
    values.update(tokenizer_type=tok["tokenizer_type"], vocab_size=tok["vocab_size"],
                  tokenizer_model=tok["tokenizer_model"])

    values.update(mcore_fields.training(cfg))
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
        check_for_nan_in_loss_and_grad=ddp["check_for_nan_in_grad"],
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
    values.update(mcore_fields.logger(cfg, run_dir))
    if run_dir is not None:
        if cfg.checkpoint.save:
            values.update(save=os.path.join(run_dir, "checkpoints"),
                          save_interval=cfg.checkpoint.save_interval or cfg.train.iters)
    values["ckpt_format"] = cfg.checkpoint.format
    if cfg.checkpoint.load is not None:
        values["load"] = cfg.checkpoint.load

    argv: list[str] = []
    for dest, value in values.items():
        argv += _flag(actions, dest, value)
    return argv + (list(cfg.backend.extra) if cfg.backend.name == name else [])


def _parse_and_validate(argv: list[str], world_size: int) -> argparse.Namespace:
    """MLM's own parse_args + validate_args on `argv`, leaving sys.argv and the environment as they were."""
    import torch
    from megatron.training import arguments

    # validate_args asks the GPU's architecture (TP/CP > 1, grouped GEMM); on a CPU-only machine we validate
    # for Hopper, the architecture these configs target.
    hopper = contextlib.ExitStack()
    if not torch.cuda.is_available():
        hopper.enter_context(mock.patch.object(arguments, "get_device_arch_version", lambda: 9))
        hopper.enter_context(mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)))
    with common.world(world_size), common.quiet(), mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]):
        with hopper:
            args = arguments.parse_args()
            arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    # The flag is store_true with default None; megatron-core's dataclass (and Bridge) use False. Same behaviour.
    args.use_cpu_initialization = bool(args.use_cpu_initialization)
    return args


def native_config(cfg, run_dir: str | None = None, world_size: int | None = None) -> Native:
    compat.install()
    from unified_train import plan

    world_size = world_size or plan.world_size(cfg)
    argv = build_argv(cfg, run_dir)
    args = _parse_and_validate(argv, world_size)
    return Native(argv=argv, args=args, world_size=world_size, rope_scaling_factor=cfg.model.rope_scaling_factor,
                  data_seed=config.data_seed(cfg))


def model_config(native: Native):
    """The GPTModelConfig `pretrain_gpt.py` builds. MLM 0.19.2 ignores --rope-scaling-factor here (it keeps the
    dataclass default 8.0), so we carry the unified value across explicitly."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.argument_utils import gpt_config_from_args

    if getattr(native.args, "padded_vocab_size", None) is None:
        with common.quiet():
            build_tokenizer(native.args)  # sets args.padded_vocab_size
    model_cfg = gpt_config_from_args(native.args)
    model_cfg.rope_scaling_factor = native.rope_scaling_factor
    return model_cfg


def dataset_config(args, data_seed: int | None = None):
    """The GPTDatasetConfig `pretrain_gpt.py` builds from args (shuffled with `data_seed`, default --seed)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    with common.quiet():
        tokenizer = build_tokenizer(args)
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed if data_seed is None else data_seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
        hybrid_context_parallel=args.hybrid_context_parallel,
        inter_document_masking=args.dataloader_inter_document_masking,
    )


def describe(native: Native) -> dict[str, object]:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training import global_vars
    from megatron.training.training import (
        get_megatron_ddp_config,
        get_megatron_optimizer_config,
        get_optimizer_param_scheduler,
    )

    args = native.args
    model_cfg = model_config(native)
    out = common.flatten("transformer", model_cfg.transformer, common.dataclass_fields(type(model_cfg.transformer)))
    out.update(common.flatten("gpt", model_cfg, _GPT_FIELDS))
    out["gpt.vocab_size"] = args.padded_vocab_size
    out.update(common.flatten("optimizer", get_megatron_optimizer_config(args)[0], common.dataclass_fields(OptimizerConfig)))
    out.update(common.flatten("ddp", get_megatron_ddp_config(args), common.dataclass_fields(DistributedDataParallelConfig)))
    out.update(common.flatten("dataset", dataset_config(args, native.data_seed), _DATASET_FIELDS))
    out.update({"train.train_iters": args.train_iters, "train.micro_batch_size": args.micro_batch_size,
                "train.global_batch_size": args.global_batch_size, "train.seq_length": args.seq_length,
                "validation.eval_interval": args.eval_interval, "validation.eval_iters": args.eval_iters,
                "rng.seed": args.seed, "rng.data_parallel_random_init": args.data_parallel_random_init,
                "tokenizer.tokenizer_type": args.tokenizer_type, "tokenizer.vocab_size": args.vocab_size,
                "data.dataloader_type": args.dataloader_type, "data.data_sharding": args.data_sharding,
                "data.num_workers": args.num_workers})

    def make_scheduler(optimizer):
        previous = global_vars._GLOBAL_ARGS
        global_vars._GLOBAL_ARGS = argparse.Namespace(**vars(args))  # the scheduler builder reads global args
        try:
            return get_optimizer_param_scheduler(optimizer)
        finally:
            global_vars._GLOBAL_ARGS = previous

    out.update(common.schedule_trace(make_scheduler, args.train_iters, args.global_batch_size))
    return out


_GPT_FIELDS = ("seq_length", "position_embedding_type", "rotary_base", "rotary_percent", "rope_scaling",
               "rope_scaling_factor", "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
               "fp16_lm_cross_entropy", "seq_len_interpolation_factor")
_DATASET_FIELDS = ("random_seed", "sequence_length", "blend", "blend_per_split", "split", "split_matrix", "mock",
                   "reset_position_ids", "reset_attention_mask", "eod_mask_loss", "create_attention_mask",
                   "add_extra_token_to_sequence", "drop_last_partial_validation_sequence")


def export(native: Native) -> list[str]:
    """The upstream invocation: Megatron-LM's pretrain_gpt.py under torchrun with the same flags.
    (Upstream shuffles data with --seed; a data.seed different from rng.seed has no upstream flag.)"""
    return ["torchrun", f"--nproc-per-node={native.world_size}", "pretrain_gpt.py", *native.argv]


def export_line(native: Native) -> str:
    return shlex.join(export(native))


# ---------------------------------------------------------------------------------------------------------------
# The GPT glue (equivalent to pretrain_gpt.py @ core_r0.19.0, written for unified_train).


def _get_batch(data_iterator, vp_stage=None):
    """Fetch a micro-batch on TP rank 0, broadcast it over TP, then slice it for CP."""
    import torch
    from megatron.core import mpu
    from megatron.core.utils import (
        flatten_batch_for_packed_sequences,
        get_batch_on_this_cp_rank,
        get_batch_on_this_tp_rank,
    )
    from megatron.training import get_args
    from megatron.training.utils.common_utils import is_first_or_last_pipeline_stage

    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage) and not args.mtp_num_layers:
        return None, None, None, None, None
    batch = None
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
        batch = {k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=bool(args.mtp_num_layers),
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = flatten_batch_for_packed_sequences(batch)
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    return (batch.get("tokens"), batch.get("labels"), batch.get("loss_mask"), batch.get("attention_mask"),
            batch.get("position_ids"))


def _loss(loss_mask, output_tensor, model=None):
    """Sum of masked token losses plus the token count; MCore divides by the global token count."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    args = get_args()
    if args.check_for_nan_in_loss_and_grad:
        rsm = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rsm.validate_result(result=loss, rejection_func=reject, message=f"found {what} in local forward loss",
                                tolerance=0.0, fatal=True)
    if args.check_for_spiky_loss:
        rsm = get_rerun_state_machine()
        rsm.validate_result(result=loss, rejection_func=partial(rsm.is_unexpectedly_large, threshold=10, context="loss"),
                            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def _forward_step(data_iterator, model, return_schedule_plan=False):
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids = _get_batch(
        data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(_loss, loss_mask, model=model)


def _dataset_built_on_rank(vp_stage=None):
    from megatron.core import mpu
    from megatron.training.utils.common_utils import is_first_or_last_pipeline_stage

    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def _datasets_provider(train_val_test_num_samples, vp_stage=None, data_seed=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args

    args = get_args()
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        cls, train_val_test_num_samples, partial(_dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config(args, data_seed),
    ).build()


def datasets_provider(data_seed: int | None = None):
    """The provider MLM's pretrain calls. It builds on every rank so the builder's internal barriers line up
    (upstream's pretrain_gpt.py sets the same attribute)."""
    provider = partial(_datasets_provider, data_seed=data_seed)
    provider.is_distributed = True
    return provider


def _embedding_ranks(pp_ranks):
    """First stage, plus the last stage when embeddings are tied across a pipeline."""
    from megatron.training import get_args

    args = get_args()
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not args.untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return sorted(set(ranks))


def train(native: Native, sink) -> None:
    """Run MLM's real `pretrain` in this process, feeding `sink` from hooks on MLM's own functions."""
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import num_floating_point_operations

    args = native.args
    with common.quiet():
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
        sink.record_train(iteration, None if loss is None else float(loss), grad_norm, lr,
                          time.perf_counter() - start)
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

    def capture_optimizer(*a, **kw):
        result = original_setup(*a, **kw)
        optimizer.append(result[1])
        sink.training_started()
        return result

    patches = [mock.patch.object(training, "train_step", timed_train_step),
               mock.patch.object(training, "evaluate", tracked_evaluate),
               mock.patch.object(training, "evaluate_and_print_results", tracked_eval_print),
               mock.patch.object(training, "setup_model_and_optimizer", capture_optimizer),
               # ft_integration re-parses sys.argv: show it our flags, not Hydra's.
               mock.patch.object(sys, "argv", ["pretrain_gpt.py", *native.argv])]
    for p in patches:
        p.start()
    try:
        training.set_startup_timestamps(program_start=time.time(), main_entry=time.time())
        training.pretrain(container, datasets_provider(native.data_seed), ModelType.encoder_or_decoder, _forward_step,
                          get_embedding_ranks=_embedding_ranks)
    except SystemExit as exc:  # exit-interval / signal paths end the loop with SystemExit
        if exc.code not in (0, None):
            raise
    finally:
        for p in reversed(patches):
            p.stop()
        del container


def teardown() -> None:
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
    common.release_process_state()


def write_native(native: Native, directory: str) -> None:
    """MLM's native config: the flag list (one per line) and the equivalent upstream command."""
    with open(os.path.join(directory, "mlm_args.txt"), "w") as f:
        f.write("\n".join(native.argv) + "\n")
    with open(os.path.join(directory, "mlm_command.sh"), "w") as f:
        f.write(export_line(native) + "\n")
