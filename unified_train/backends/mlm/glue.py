"""The GPT glue MLM's `pretrain` calls: what upstream's `pretrain_gpt.py` (core_r0.19.0) provides and the
megatron-core wheel does not ship. Written to the same contract (batch fetch and broadcast, token-count loss,
dataset provider, embedding ranks), so the numerics are those of the native script."""

from __future__ import annotations

from functools import partial

from unified_train.backends import process_state


def dataset_config(args, data_seed: int | None = None):
    """The GPTDatasetConfig `pretrain_gpt.py` builds from args (shuffled with `data_seed`, default --seed)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    with process_state.quiet():
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


def get_batch(data_iterator, vp_stage=None):
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
    return (
        batch.get("tokens"),
        batch.get("labels"),
        batch.get("loss_mask"),
        batch.get("attention_mask"),
        batch.get("position_ids"),
    )


def loss_func(loss_mask, output_tensor, model=None):
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
            rsm.validate_result(
                result=loss,
                rejection_func=reject,
                message=f"found {what} in local forward loss",
                tolerance=0.0,
                fatal=True,
            )
    if args.check_for_spiky_loss:
        rsm = get_rerun_state_machine()
        rsm.validate_result(
            result=loss,
            rejection_func=partial(rsm.is_unexpectedly_large, threshold=10, context="loss"),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan=False):
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(
        data_iterator, get_attr_wrapped_model(model, "vp_stage")
    )
    timers("batch-generator").stop()
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask, model=model)


def dataset_built_on_rank(vp_stage=None):
    from megatron.core import mpu
    from megatron.training.utils.common_utils import is_first_or_last_pipeline_stage

    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def build_datasets(train_val_test_num_samples, vp_stage=None, data_seed=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args

    args = get_args()
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        cls,
        train_val_test_num_samples,
        partial(dataset_built_on_rank, vp_stage=vp_stage),
        dataset_config(args, data_seed),
    ).build()


def datasets_provider(data_seed: int | None = None):
    """The provider MLM's pretrain calls. It builds on every rank so the builder's internal barriers line up
    (upstream's pretrain_gpt.py sets the same attribute)."""
    provider = partial(build_datasets, data_seed=data_seed)
    provider.is_distributed = True
    return provider


def embedding_ranks(pp_ranks):
    """First stage, plus the last stage when embeddings are tied across a pipeline."""
    from megatron.training import get_args

    args = get_args()
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not args.untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return sorted(set(ranks))
