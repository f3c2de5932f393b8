"""The unified config expressed in megatron-core's own field names, once, for both backends.

MLM's argparse destinations and Bridge's config dataclasses are both generated from the same megatron-core /
megatron.training dataclasses (TransformerConfig, OptimizerConfig, SchedulerConfig, ...), so one mapping
"unified field -> megatron field" serves both stacks. Each adapter only knows how to deliver these fields into
its stack (flags for MLM, attributes for Bridge). Values are plain Python (names, not callables).
"""

from __future__ import annotations

import signal

from unified_train import config as C
from unified_train import datafiles, resume, rundir


def moe_layer_pattern(cfg) -> list[int] | None:
    m = cfg.model
    if m.num_experts is None:
        return None
    return [0] * m.moe_first_dense_layers + [1] * (m.num_layers - m.moe_first_dense_layers)


# Fields whose MLM command-line default differs from the megatron-core dataclass default that Bridge starts from.
# Each is inert for what the unified schema can enable (FP8/FP4, FSDP, Muon, CPU offload, inference, CP comm), but
# we pin one value on both sides so the parity diff stays exact rather than carrying an ignore list.
PINNED_TRANSFORMER = dict(
    cp_comm_type="p2p",
    # Bridge's mixed-precision presets (bf16_mixed, ...) write these three after construction.
    num_layers_at_start_in_bf16=0,
    num_layers_at_end_in_bf16=0,
    fp8_recipe="tensorwise",
    deallocate_pipeline_outputs=True,  # memory only; Bridge's MLA provider turns it off
)
PINNED_OPTIMIZER = dict(
    barrier_with_L1_time=True, fp8_recipe="tensorwise", muon_momentum=0.9, optimizer_offload_fraction=1.0
)
PINNED_DDP = dict(data_parallel_sharding_strategy="optim_grads_params")


def transformer(cfg) -> dict:
    """TransformerConfig fields (activation as a name: 'gelu' | 'silu')."""
    m, k, p = cfg.model, cfg.kernels, cfg.parallel
    swiglu = m.activation == "swiglu"
    fields = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.num_query_groups is not None else m.num_attention_heads,
        ffn_hidden_size=C.ffn_hidden_size(cfg),
        kv_channels=m.kv_channels if m.kv_channels is not None else m.hidden_size // m.num_attention_heads,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=swiglu,
        activation="silu" if swiglu else "gelu",
        add_bias_linear=m.add_bias_linear,
        # MLM ties the QKV bias to add_bias_linear; the attention modules use (add_bias_linear or add_qkv_bias).
        add_qkv_bias=m.add_qkv_bias or m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        # Stated for both: MLM leaves it to megatron-core (= tp), Bridge's provider defaults to 1.
        expert_tensor_parallel_size=p.etp or p.tp,
        virtual_pipeline_model_parallel_size=p.vpp,
        sequence_parallel=p.sequence_parallel,
        # The interleaved (virtual-pipeline) schedule overlaps its P2P transfers; MLM derives both from vpp.
        overlap_p2p_comm=p.vpp is not None,
        batch_p2p_comm=p.vpp is None,
        transformer_impl=C.transformer_impl(cfg),
        attention_backend=k.attention_backend,
        # Without a bias there is nothing to fuse; MLM forces this off by itself, Bridge does not.
        bias_activation_fusion=k.bias_activation_fusion and m.add_bias_linear,
        bias_dropout_fusion=k.bias_dropout_fusion,
        masked_softmax_fusion=k.masked_softmax_fusion,
        persist_layer_norm=k.persist_layer_norm,
        gradient_accumulation_fusion=k.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=k.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=k.cross_entropy_fusion_impl,
        # RoPE fusion only exists with RoPE; MLM forces it off otherwise.
        apply_rope_fusion=k.apply_rope_fusion and m.position_embedding_type == "rope",
        attention_softmax_in_fp32=k.attention_softmax_in_fp32,
        deterministic_mode=cfg.determinism.deterministic_mode,
        inference_sampling_seed=cfg.rng.seed,  # MLM derives it from --seed
        # No weight-remat sharding: each weight is split across exactly the TP ranks (MLM resolves these itself).
        tensor_parallel_num_weight_shards=p.tp,
        expert_tensor_parallel_num_weight_shards=p.etp or p.tp,
        **PINNED_TRANSFORMER,
    )
    if m.num_experts is not None:
        fields.update(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size if m.moe_ffn_hidden_size is not None else C.ffn_hidden_size(cfg),
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=moe_layer_pattern(cfg),
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_grouped_gemm=m.moe_grouped_gemm,
        )
    if m.multi_latent_attention:
        fields.update(
            multi_latent_attention=True,
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_head_dim,
            qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            rope_type=m.rope_type,
            rotary_scaling_factor=m.rotary_scaling_factor,
            mscale=m.mscale,
            mscale_all_dim=m.mscale_all_dim,
        )
    return fields


def gpt(cfg) -> dict:
    """GPT-model fields outside TransformerConfig (GPTModelConfig / GPTModelProvider names)."""
    m = cfg.model
    return dict(
        vocab_size=m.vocab_size,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        seq_length=C.position_table_size(cfg),
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        rotary_percent=m.rotary_percent,
        rope_scaling=m.rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
    )


def training(cfg) -> dict:
    t = cfg.train
    exit_signal = C.exit_signal(cfg)
    return dict(
        train_iters=t.iters,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        # Save at the end of the iteration and stop, on the signal a scheduler sends before it stops the job.
        exit_signal_handler=exit_signal is not None,
        exit_signal=signal.Signals[exit_signal or "SIGTERM"],
    )


def rerun(cfg) -> dict:
    """RerunStateMachineConfig fields: what a loss that fails its check does (config.TrainConfig.rerun_mode). The NaN
    check of the loss follows the gradient's (ddp below), as MLM's one flag has it for both."""
    return dict(
        rerun_mode=cfg.train.rerun_mode,
        check_for_nan_in_loss=ddp(cfg)["check_for_nan_in_grad"],
        check_for_spiky_loss=False,
    )


def validation(cfg) -> dict:
    return dict(eval_interval=C.eval_interval(cfg), eval_iters=cfg.validation.eval_iters)


def optimizer(cfg) -> dict:
    o = cfg.optim
    return dict(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer,
        **PINNED_OPTIMIZER,
    )


def scheduler(cfg) -> dict:
    s = cfg.sched
    return dict(
        lr_decay_style=s.lr_decay_style,
        lr_warmup_iters=C.warmup_iters(cfg),
        lr_decay_iters=C.decay_iters(cfg),
        lr_warmup_init=s.lr_warmup_init,
        # Constant weight decay: MLM derives start = end = weight_decay; Bridge's scheduler overwrites the
        # optimizer's value with these every step.
        weight_decay_incr_style="constant",
        start_weight_decay=cfg.optim.weight_decay,
        end_weight_decay=cfg.optim.weight_decay,
    )


def ddp(cfg) -> dict:
    return dict(
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        # With fp16's dynamic loss scaling a NaN gradient is the scaler's signal, not an error (MLM's rule, for both).
        check_for_nan_in_grad=cfg.precision.dtype != "fp16",
        align_param_gather=cfg.parallel.vpp is not None,  # as MLM derives it for the interleaved schedule
        **PINNED_DDP,
    )


def dataset(cfg) -> dict:
    d = cfg.data
    return dict(
        random_seed=C.data_seed(cfg),
        sequence_length=cfg.train.seq_length,
        mock=d.type == "mock",
        data_path=datafiles.blend_list(d.data_path),  # the flat MCore blend list
        split=d.split,
        num_workers=d.num_workers,
        dataloader_type=d.dataloader_type,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
    )


def tokenizer(cfg) -> dict:
    d = cfg.data
    return dict(tokenizer_type=d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_size=cfg.model.vocab_size)


def rng(cfg) -> dict:
    return dict(seed=cfg.rng.seed)


def logger(cfg, job: rundir.JobIdentity) -> dict:
    """LoggerConfig fields (MLM flags and Bridge's LoggerConfig share the names). W&B grouping (group = pair id,
    job_type = backend, tags) travels in the environment both stacks' `wandb.init` reads: see results/wandb_runs.py."""
    out = dict(
        log_interval=cfg.logger.log_interval,
        tensorboard_dir=None,
        wandb_project=None,
        wandb_exp_name=None,
        wandb_save_dir=None,
        wandb_entity=None,
    )
    if job.run_dir is None:
        return out
    if cfg.logger.tensorboard:
        out["tensorboard_dir"] = job.subdir(rundir.TENSORBOARD)
    if cfg.logger.wandb.enabled:
        out.update(
            wandb_project=cfg.logger.wandb.project,
            wandb_exp_name=job.run_name,
            wandb_save_dir=job.subdir(rundir.WANDB_DIR),
            wandb_entity=cfg.logger.wandb.entity,
        )
    return out


def checkpoint(cfg, job: rundir.JobIdentity) -> dict:
    """CheckpointConfig fields: saved into the run directory (at the end unless an interval is set), loaded from
    where unified_train.resume says the job starts (its own checkpoints on a restart, else checkpoint.load)."""
    save = job.subdir(rundir.CHECKPOINTS) if cfg.checkpoint.save else None
    start = resume.start(cfg, job.run_dir)
    return dict(
        save=save,
        save_interval=(cfg.checkpoint.save_interval or cfg.train.iters) if save else None,
        ckpt_format=cfg.checkpoint.format,
        load=start.checkpoints,
        ckpt_step=start.iteration,
    )


# --- back from megatron-core field names to unified keys ----------------------------------------------------------

_BY_CONFIG = (transformer, gpt, training, rerun, validation, optimizer, scheduler, ddp, dataset, tokenizer, rng)
_BY_JOB = (logger, checkpoint)


def all_fields(cfg) -> dict[str, object]:
    """Every megatron-core field the unified config sets, with its value, as one flat dict."""
    job = rundir.JobIdentity("mlm", cfg.model.name, 1, 1, 1, "", run_dir="/unified_train/keys")
    out: dict[str, object] = {}
    for fields in _BY_CONFIG:
        out.update(fields(cfg))
    for fields in _BY_JOB:
        out.update(fields(cfg, job))
    return out


def unified_keys(cfg, megatron_fields: list[str]) -> list[str]:
    """The unified keys whose value reaches any of `megatron_fields`, found by changing each key in turn and
    watching the translation above: when a stack refuses a field, the user is told which of *our* keys to change,
    with no table to keep in step with the stacks (tests/test_stack_checks.py)."""
    from omegaconf import OmegaConf, open_dict

    wanted = set(megatron_fields)
    base = all_fields(cfg)
    keys = []
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        changed = _another(cfg, key, value)
        if changed is None:
            continue
        trial = cfg.copy()
        with open_dict(trial):
            OmegaConf.update(trial, key, changed, merge=False)
        try:
            after = all_fields(trial)
        except Exception:  # noqa: BLE001 -- a change the derivations cannot take says nothing about this field
            continue
        if any(base.get(f) != after.get(f) for f in wanted):
            keys.append(key)
    return keys


def _leaves(data, prefix: str = ""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _another(cfg, key: str, value):
    """A different valid-looking value for `key` (None where no such value can be guessed)."""
    allowed = C.choices().get(key)
    if allowed:
        return next((a for a in allowed if a != value), None)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 + 1
    if isinstance(value, float):
        return value * 0.5 + 1e-3
    if isinstance(value, str):
        return value + "_x"
    if value is None:  # mostly Optional[int] sizes and steps derived when unset
        return 2
    return None
