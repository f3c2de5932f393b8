"""Records mode=numerics files from a real megatron-core GPTModel (local layer spec) on the CPU, on a one-rank gloo
group, through unified_train.backends.numerics exactly as the adapters use it. Run as a script by
tests/test_numerics.py, so that the process group and the CUDA stand-ins stay out of the test process.

    python numerics_job.py OUT_DIR  ->  OUT_DIR/<variant>/numerics.jsonl per variant, one JSON line on stdout

Variants, all from the same weights and batch: `plain` (fp32 GPTModel, gradients in .grad) and `again` (the same
run once more); `softmax` (layer 1's core attention with another softmax scale); `grad_hook` (layer 1's first MLP
weight gradient scaled on its way into .grad: only backward differs); `ddp` (bf16: megatron-core's DDP around its
Float16Module, gradients in main_grad, recorded when megatron's optimizer steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from cuda_on_cpu import cuda_on_cpu

SEQ, VOCAB, MICROBATCHES = 16, 128, 2


def cpu_rng_tracker() -> None:
    """megatron-core's RNG tracker forks the CUDA generator around attention dropout; here it forks the CPU's."""
    from megatron.core.tensor_parallel import random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def build(bf16: bool = False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ
    )
    return config, model


def batch(microbatch: int):
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(microbatch))
    return tokens, torch.arange(SEQ).expand(2, SEQ)


def train_one_iteration(model) -> list[torch.Tensor]:
    """Forward and backward of every micro-batch (gradients accumulate); the per-token losses."""
    losses = []
    for microbatch in range(MICROBATCHES):
        tokens, positions = batch(microbatch)
        loss = model(tokens, positions, None, labels=tokens)
        loss.float().mean().backward()
        losses.append(loss.detach())
    return losses


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def plain(out: str, change=None) -> dict:
    from unified_train.backends import numerics

    _, model = build()
    if change is not None:
        change(model)
    recorder = numerics.Recorder(out)
    recorder.attach([model])
    losses = train_one_iteration(model)
    path = recorder.finish()
    grads = {name: sha256(p.grad) for name, p in model.named_parameters()}
    recorder.finish()  # a second call writes nothing new
    train_one_iteration(model)  # hooks are gone: nothing is recorded after finish
    return {
        "path": path,
        "records_after_finish": len(recorder.records),
        "loss_sha256": [sha256(loss) for loss in losses],
        "loss_norm": [float(loss.double().norm()) for loss in losses],
        "modules": {name or numerics.ROOT: type(m).__name__ for name, m in model.named_modules()},
        "grad_sha256": grads,
    }


def softmax_scale(model) -> None:
    model.decoder.layers[0].self_attention.core_attention.softmax_scale *= 1.25


def grad_hook(model) -> None:
    model.decoder.layers[0].mlp.linear_fc1.weight.register_hook(lambda grad: grad * 1.5)


def ddp(out: str) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from unified_train.backends import numerics

    config, inner = build(bf16=True)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, Float16Module(config, inner))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, use_distributed_optimizer=True), [model]
    )
    step_before = type(optimizer).step
    recorder = numerics.Recorder(out)
    recorder.attach([model], optimizer)
    train_one_iteration(model)  # one rank: the gradient buffer already holds the reduced gradient
    main_grads = {name: sha256(p.main_grad) for name, p in inner.named_parameters()}
    assert recorder.written is None  # nothing before the optimizer steps
    optimizer.step()
    return {
        "path": recorder.written,
        "main_grad_sha256": main_grads,
        "step_restored": "step" not in vars(optimizer) and type(optimizer).step is step_before,
        "wrapped_names": sorted({n for n, _ in model.named_modules()})[:3],
    }


def main(out_dir: str) -> dict:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    cpu_rng_tracker()
    with cuda_on_cpu():
        return {
            "plain": plain(os.path.join(out_dir, "plain")),
            "again": plain(os.path.join(out_dir, "again")),
            "softmax": plain(os.path.join(out_dir, "softmax"), softmax_scale),
            "grad_hook": plain(os.path.join(out_dir, "grad_hook"), grad_hook),
            "ddp": ddp(os.path.join(out_dir, "ddp")),
        }


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{sys.argv[1]}/.rendezvous")
    result = main(sys.argv[1])
    dist.destroy_process_group()
    print(json.dumps(result))
