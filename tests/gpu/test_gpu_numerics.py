"""mode=numerics on a GPU (marker `gpu`): where a pair's numerics part, found through hooks on both stacks' real
models and named in comparison.md. Run on the GPU node:

    python -m pytest tests/gpu/test_gpu_numerics.py -m gpu -s

A knob changed on one side only is found in the module it changes, in layer 1 (`decoder.layers.0`); the MoE pair,
whose token dispatch is not deterministic, is found in its first MoE layer; pairs that are bitwise stay bitwise in
every module output and gradient.

`backend.extra` belongs to whichever backend a job runs (MLM flags, or Bridge overrides), so a pair mismatched on
one side is two single runs, one per backend; they still pair, since the pair id leaves the backend section out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_helpers import GOLDEN_LOSSES, UPSTREAM_LOSSES, UPSTREAM_RTOL, job_dirs, publish, read_metrics, run_unified

from unified_train import rundir
from unified_train.results import compare, numerics

pytestmark = pytest.mark.gpu

COMMON = ["mode=numerics", "logger=none"]
MOE = [
    "model=deepseek_v2_lite",
    "model.num_layers=2",
    "model.multi_latent_attention=false",
    "model.num_query_groups=16",
]


def _localised(dirs: dict[str, Path]) -> numerics.Localisation:
    for backend, job_dir in dirs.items():
        assert (job_dir / rundir.NUMERICS).is_file(), f"{backend} recorded nothing in {job_dir}"
        assert len(read_metrics(job_dir)) == 1, backend  # one training iteration
        assert not (job_dir / rundir.CHECKPOINTS / rundir.CHECKPOINT_TRACKER).exists(), backend  # nothing saved
    found = numerics.localise(*(rundir.read_numerics(str(dirs[b])) for b in ("mlm", "bridge")))
    # Both stacks' models are megatron-core's modules under the same names: nothing is recorded by one side only.
    assert not found.only_ref and not found.only_cand, (found.only_ref[:5], found.only_cand[:5])
    assert found.outputs > 0 and found.grads > 0
    return found


def pair(tmp_path: Path, name: str, *overrides: str) -> tuple[numerics.Localisation, str]:
    """`-m backend=mlm,bridge mode=numerics ...`: the comparison the multirun's callback wrote, and what it found."""
    sweep = tmp_path / name
    run_unified(["-m", "backend=mlm,bridge", f"hydra.sweep.dir={sweep}", *COMMON, *overrides], tmp_path / f"{name}.log")
    report = (sweep / rundir.COMPARISON_MD).read_text()
    print(report)
    publish(name, report)
    return _localised(job_dirs(sweep)), report


def _halves(tmp_path: Path, name: str, mlm: list[str], bridge: list[str]) -> tuple[numerics.Localisation, str]:
    """One single run per backend (each with its own overrides) into one directory, then the comparison."""
    root = tmp_path / name
    for backend, overrides in (("mlm", mlm), ("bridge", bridge)):
        run_unified(
            [f"backend={backend}", f"hydra.run.dir={root / backend}", *COMMON, *overrides],
            tmp_path / f"{name}_{backend}.log",
        )
    report, _ = compare.report([str(root)], out_dir=str(root))
    print(report)
    publish(name, report)
    return _localised({b: root / b for b in ("mlm", "bridge")}), report


def test_default_pair_is_bitwise_in_every_module_and_gradient(tmp_path):
    """The bitwise default pair, looked at module by module; and its one iteration is the full run's first."""
    import torch

    found, report = pair(tmp_path, "numerics_default")
    assert found.equal, report
    assert "is bitwise equal" in report
    for job_dir in job_dirs(tmp_path / "numerics_default").values():
        loss = read_metrics(job_dir)[0]["lm loss"]
        assert loss == pytest.approx(UPSTREAM_LOSSES[0], rel=UPSTREAM_RTOL)
        golden = GOLDEN_LOSSES.get(torch.cuda.get_device_name())
        assert golden is None or loss == golden[0], (loss, golden)


def test_an_attention_knob_on_bridge_only_is_found_in_layer_1_attention(tmp_path):
    """vanilla_gpt runs megatron-core's DotProductAttention (attention dropout is on); Bridge alone gets another
    softmax scale (MLM has no flag for it). Everything before layer 1's core attention is equal, and the first
    difference is inside it (its scale-mask-softmax submodule, the innermost module that sees the scores)."""
    found, report = _halves(tmp_path, "numerics_softmax_scale", [], ["backend.extra=['model.softmax_scale=0.1']"])
    first = found.first_output
    assert first is not None, report
    assert first.name.startswith("decoder.layers.0.self_attention.core_attention"), first.name
    assert found.last_equal_output == "decoder.layers.0.self_attention.linear_qkv", found.last_equal_output
    assert f"first differing module output `{first.name}`" in report


def test_an_mlp_knob_on_mlm_only_is_found_in_layer_1_mlp(tmp_path):
    """MLM alone gets squared ReLU instead of GeLU (`--squared-relu`). The activation is a function inside the MLP,
    not a module: its first input (linear_fc1) is equal and the module after it (linear_fc2) is the first to
    differ."""
    found, report = _halves(tmp_path, "numerics_squared_relu", ["backend.extra=[--squared-relu]"], [])
    first = found.first_output
    assert first is not None, report
    assert first.name == "decoder.layers.0.mlp.linear_fc2", first.name
    assert found.last_equal_output == "decoder.layers.0.mlp.linear_fc1", found.last_equal_output


def test_moe_pair_is_found_in_the_first_moe_layer(tmp_path):
    """The issue's pair (DeepSeek-V2-Lite layout, 2 layers: dense, then 64 experts), default determinism: its
    iteration-1 losses differ because MoE token dispatch is not deterministic; the first differing output is in
    the MoE block of layer 2 (router, experts or the MoE layer itself), after a bitwise-equal dense layer 1."""
    found, report = pair(tmp_path, "numerics_moe", *MOE)
    first = found.first_output
    assert first is not None, report
    assert first.name.startswith("decoder.layers.1.mlp"), first.name
    assert not any(d.name.startswith(("embedding", "decoder.layers.0")) for d in found.output_differences)
    assert "first differing module output `decoder.layers.1.mlp" in report


def test_moe_pair_under_strict_determinism_is_bitwise_everywhere(tmp_path):
    found, report = pair(tmp_path, "numerics_moe_strict", *MOE, "determinism=strict")
    assert found.equal, report
