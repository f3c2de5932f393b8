"""Saves and resumes megatron-core's real DistributedOptimizer (torch's Adam, no apex/TE) through torch_dist on a
one-rank gloo group, on the CPU. Run as a script by tests/test_resume_optimizer.py, so that the process group,
the CUDA stand-ins and dist_checkpointing's spawned writer stay out of the test process.

    python resume_optimizer_job.py CHECKPOINT_DIR {patched|upstream|upstream_load}  ->  one JSON line on stdout
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from cuda_on_cpu import cuda_on_cpu

SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}  # MLM's and Bridge's default for torch_dist


def build(seed: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    # bf16 weights with fp32 main weights in the optimizer: the default precision of both stacks here.
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True, bf16=True
    )

    class TwoLayers(MegatronModule):
        def __init__(self):
            super().__init__(config)
            torch.manual_seed(seed)
            self.first = torch.nn.Linear(8, 16, dtype=torch.bfloat16)
            self.second = torch.nn.Linear(16, 4, dtype=torch.bfloat16)

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, TwoLayers())
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=True, use_distributed_optimizer=True
    )
    return model, get_megatron_optimizer(optimizer_config, [model])


def step(model, optimizer, batch: int) -> None:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(batch)).bfloat16()
    model(x).float().square().mean().backward()  # one rank: the gradient buffer is already the reduced shard
    optimizer.step()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def main(checkpoint_dir: str, variant: str) -> dict:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    # The package's own methods, as shipped: both ("upstream"), or only load_state_dict ("upstream_load").
    unwrap = {"patched": (), "upstream": ("state_dict", "load_state_dict"), "upstream_load": ("load_state_dict",)}
    for name in unwrap[variant]:
        setattr(cls, name, getattr(cls, name).__wrapped__)
    parallel_state.initialize_model_parallel()
    report: dict = {}

    model, optimizer = build(seed=1)
    for batch in (1, 2):
        step(model, optimizer, batch)
    sharded = {"model": model.sharded_state_dict()}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=False, metadata=SHARDING)
    dist_checkpointing.save(sharded, checkpoint_dir)
    step(model, optimizer, 3)
    continuous = params(model)

    resumed_model, resumed_optimizer = build(seed=2)  # other weights: everything must come from the checkpoint
    try:
        template = {"model": resumed_model.sharded_state_dict()}
        template["optimizer"] = resumed_optimizer.sharded_state_dict(
            template["model"], is_loading=True, metadata=SHARDING
        )
    except AssertionError as error:
        report["load"] = f"AssertionError at {_last_frame(error)}"
        return report
    loaded = dist_checkpointing.load(template, checkpoint_dir)
    resumed_model.module.load_state_dict({k.removeprefix("module."): v for k, v in loaded["model"].items()})
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    inner = resumed_optimizer.chained_optimizers[0].optimizer
    report["load"] = "ok"
    report["steps_after_load"] = sorted({float(s["step"]) for s in inner.state.values()})
    report["shared_step_tensors"] = len({id(s["step"]) for s in inner.state.values()}) < len(inner.state)
    step(resumed_model, resumed_optimizer, 3)
    report["steps_after_resumed_step"] = sorted({float(s["step"]) for s in inner.state.values()})
    report["bitwise_equal_after_step_3"] = all(
        torch.equal(a, b) for a, b in zip(continuous, params(resumed_model), strict=True)
    )
    return report


def _last_frame(error: BaseException) -> str:
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{sys.argv[1]}.rendezvous")
    with cuda_on_cpu():
        result = main(sys.argv[1], sys.argv[2])
    dist.destroy_process_group()
    print(json.dumps(result))
