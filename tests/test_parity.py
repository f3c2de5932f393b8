"""Both translators, and the parity diff (zero differences everywhere; catches real mismatches)."""

from __future__ import annotations

import itertools

import pytest
from ut_helpers import PRESETS, compose, describe_both, job_for, native, run_cli

from unified_train import backends, checks
from unified_train.backends.mlm.argv import build_argv
from unified_train.modes import parity

TOPOLOGIES = list(itertools.product((1, 2, 4, 8), (1, 2)))


def _describe(backend_name, cfg):
    backend = backends.get(backend_name)
    return backend.describe(backend.native_config(cfg, job_for(cfg)))


@pytest.fixture(scope="module")
def default_both():
    return describe_both(compose(["parallel.dp=1"]))


def test_describe_covers_every_required_section(default_both):
    for side in ("mlm", "bridge"):
        keys = default_both[side]
        for prefix in (
            "transformer.",
            "gpt.",
            "optimizer.",
            "ddp.",
            "dataset.",
            "train.",
            "rng.",
            "rerun.",
            "schedule.lr@",
            "schedule.weight_decay@",
        ):
            assert any(k.startswith(prefix) for k in keys), (side, prefix)
        # One lr and one weight decay per iteration of the (10-iteration) run.
        assert sum(k.startswith("schedule.lr@") for k in keys) == 10
        assert sum(k.startswith("schedule.weight_decay@") for k in keys) == 10
        assert len(keys) > 300
    assert set(default_both["mlm"]) == set(default_both["bridge"])


def test_default_config_values_reach_both_stacks(default_both):
    for side in ("mlm", "bridge"):
        d = default_both[side]
        assert d["transformer.num_layers"] == 2 and d["transformer.hidden_size"] == 256
        assert d["transformer.num_attention_heads"] == 4 and d["transformer.ffn_hidden_size"] == 1024
        assert d["gpt.seq_length"] == 512 and d["dataset.sequence_length"] == 512
        assert d["train.micro_batch_size"] == 4 and d["train.global_batch_size"] == 32
        assert d["train.train_iters"] == 10
        assert d["optimizer.lr"] == pytest.approx(3e-4) and d["optimizer.min_lr"] == pytest.approx(3e-5)
        assert d["optimizer.adam_beta2"] == 0.95
        assert d["optimizer.bf16"] is True
        assert d["rng.seed"] == 1234 and d["dataset.random_seed"] == 1234
        assert d["dataset.mock"] is True
        assert d["gpt.vocab_size"] == 32000  # 32000 is a multiple of 128
        # Warmup of 1 iteration: lr 0 at iteration 1 from lr_warmup_init, then cosine decay to min_lr.
        lrs = [d[f"schedule.lr@{i}"] for i in range(1, 11)]
        assert lrs[1] == pytest.approx(3e-4)
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
        assert lrs[-1] > 3e-5 - 1e-12
        assert {d[f"schedule.weight_decay@{i}"] for i in range(1, 11)} == {0.033}


def test_default_config_has_zero_differences(default_both):
    assert parity.diff(default_both["mlm"], default_both["bridge"]) == []


def _topology_cfg(preset, tp, pp, extra=()):
    return compose(
        [f"model={preset}", "model.num_layers=4", f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.dp=1", *extra]
    )


@pytest.mark.parametrize("tp, pp", TOPOLOGIES, ids=[f"tp{t}pp{p}" for t, p in TOPOLOGIES])
@pytest.mark.parametrize("preset", PRESETS)
def test_zero_differences_for_every_preset_and_topology(preset, tp, pp):
    cfg = _topology_cfg(preset, tp, pp)
    errors = checks.check(cfg)
    if errors:
        # The only reason a combination is invalid here is that tp does not divide the heads/groups.
        assert all("parallel.tp" in e for e in errors), errors
        pytest.skip(f"invalid topology: {errors[0]}")
    both = describe_both(cfg)
    assert both["mlm"]["transformer.tensor_model_parallel_size"] == tp
    assert both["bridge"]["transformer.pipeline_model_parallel_size"] == pp
    assert both["mlm"]["transformer.num_layers"] == 4
    rows = parity.diff(both["mlm"], both["bridge"])
    assert rows == [], parity.table(rows)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_zero_differences_for_every_preset_in_every_precision(preset, dtype):
    """bf16 is the sweep above. fp16: Bridge's preset would reduce gradients in fp16 and keep the NaN check that
    MLM turns off for dynamic loss scaling; both follow the unified config instead."""
    cfg = _topology_cfg(preset, 2, 2, [f"precision.dtype={dtype}"])
    assert checks.check(cfg) == []
    both = describe_both(cfg)
    assert both["mlm"]["ddp.check_for_nan_in_grad"] == (dtype != "fp16")
    assert both["bridge"]["rerun.check_for_nan_in_loss"] == (dtype != "fp16")
    rows = parity.diff(both["mlm"], both["bridge"])
    assert rows == [], parity.table(rows)


@pytest.mark.parametrize("tp, ep, etp", [(1, 8, None), (2, 4, None), (2, 8, 1), (4, 2, 2), (2, 2, 4)])
def test_zero_differences_for_every_expert_split(tp, ep, etp):
    """The expert tensor-parallel size is stated for both (MLM's default is tp, Bridge's provider has 1)."""
    split = [f"parallel.tp={tp}", f"parallel.ep={ep}", "parallel.gpus_per_node=16", "train.global_batch_size=64"]
    cfg = compose(["model=deepseek_v2_lite", "model.num_layers=2", *split, *([f"parallel.etp={etp}"] if etp else [])])
    assert checks.check(cfg) == []
    both = describe_both(cfg)
    assert both["bridge"]["transformer.expert_tensor_parallel_size"] == (etp or tp)
    rows = parity.diff(both["mlm"], both["bridge"])
    assert rows == [], parity.table(rows)


def test_invalid_topologies_are_exactly_the_head_counts():
    """The skips above are real: vanilla_gpt (4 heads) and gpt_125m (12 heads) cannot use tp=8."""
    invalid = {(p, tp) for p in PRESETS for tp in (1, 2, 4, 8) if checks.check(_topology_cfg(p, tp, 1))}
    assert invalid == {("vanilla_gpt", 8), ("gpt_125m", 8)}


@pytest.mark.parametrize(
    "extra",
    [
        ["parallel.dp=2"],
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"],
        ["parallel.cp=2"],
        ["train.iters=30", "sched=linear"],
        ["rng.seed=42"],
        ["rng.seed=42", "data.seed=7"],
        ["data.dataloader_type=cyclic"],
        ["precision=fp32"],
        ["train.rerun_mode=validate_results"],
        ["kernels.bias_activation_fusion=true", "kernels.bias_dropout_fusion=true"],
        ["model=llama32_1b", "model.num_layers=2", "train.seq_length=1024"],
        [
            "model=deepseek_v2_lite",
            "model.num_layers=4",
            "parallel.ep=4",
            "parallel.dp=4",
            "train.global_batch_size=64",
        ],
    ],
    ids=lambda e: " ".join(e) if isinstance(e, list) else None,
)
def test_zero_differences_for_other_knobs(extra):
    cfg = compose(["parallel.dp=1", *extra])
    assert checks.check(cfg) == []
    both = describe_both(cfg)
    rows = parity.diff(both["mlm"], both["bridge"])
    assert rows == [], parity.table(rows)


def test_seeds_follow_rng_seed_on_both_sides():
    both = describe_both(compose(["parallel.dp=1", "rng.seed=42"]))
    for side in both.values():
        assert side["rng.seed"] == 42 and side["dataset.random_seed"] == 42


def test_data_seed_set_on_its_own_reaches_both_sides():
    both = describe_both(compose(["parallel.dp=1", "rng.seed=42", "data.seed=7"]))
    for side in both.values():
        assert side["rng.seed"] == 42 and side["dataset.random_seed"] == 7


@pytest.fixture
def deterministic_env(monkeypatch):
    """The process environment runtime/env.py sets for determinism=strict; Bridge's validation turns on
    torch.use_deterministic_algorithms, which is undone afterwards."""
    import torch

    from unified_train.runtime import env

    for key, value in env.process_env(compose(["determinism=strict"])).items():
        monkeypatch.setenv(key, value)
    yield
    torch.use_deterministic_algorithms(False)


def test_zero_differences_deterministic_mode(deterministic_env):
    cfg = compose(["parallel.dp=1", "determinism=strict"])
    both = describe_both(cfg)
    assert both["mlm"]["transformer.deterministic_mode"] is True
    assert both["mlm"]["transformer.cross_entropy_loss_fusion"] is False
    rows = parity.diff(both["mlm"], both["bridge"])
    assert rows == [], parity.table(rows)


def test_parity_deterministic_mode_without_launcher_env(monkeypatch):
    """mode=parity applies the job environment itself (Bridge's validation needs NCCL_ALGO under determinism)."""
    import torch

    monkeypatch.delenv("NCCL_ALGO", raising=False)
    try:
        describe_both(compose(["parallel.dp=1", "determinism=strict"]))
    finally:
        torch.use_deterministic_algorithms(False)


# -- the diff catches deliberate mismatches ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_default(default_both):
    return default_both["mlm"]


def _mismatch(mlm_side, bridge_overrides):
    bridge_side = _describe("bridge", compose(["parallel.dp=1", *bridge_overrides]))
    return {row[0]: row for row in parity.diff(mlm_side, bridge_side)}


def test_diff_catches_adam_beta2(mlm_default):
    rows = _mismatch(mlm_default, ["optim.adam_beta2=0.999"])
    assert set(rows) == {"optimizer.adam_beta2"}
    assert rows["optimizer.adam_beta2"][1:] == (0.95, 0.999)


def test_rerun_mode_is_one_choice_for_stacks_whose_defaults_differ(mlm_default):
    """On a NaN loss MLM's default reruns the iteration and saves, Bridge's fails at once: the unified
    train.rerun_mode sets both, and the diff sees it."""
    from unittest import mock

    from megatron.bridge.training.config import RerunStateMachineConfig
    from megatron.training import arguments

    with mock.patch("sys.argv", ["pretrain_gpt.py"]):
        assert arguments.parse_args().rerun_mode == "validate_results"
    assert RerunStateMachineConfig().rerun_mode == "disabled"
    assert mlm_default["rerun.rerun_mode"] == "disabled"
    rows = _mismatch(mlm_default, ["train.rerun_mode=validate_results"])
    assert set(rows) == {"rerun.rerun_mode"}


def test_diff_catches_fusion_flags(mlm_default):
    rows = _mismatch(mlm_default, ["kernels.bias_activation_fusion=true"])
    assert "transformer.bias_activation_fusion" in rows
    assert rows["transformer.bias_activation_fusion"][1:] == (False, True)
    rows = _mismatch(mlm_default, ["kernels.cross_entropy_loss_fusion=false"])
    assert "transformer.cross_entropy_loss_fusion" in rows


def test_diff_catches_position_table(mlm_default):
    rows = _mismatch(mlm_default, ["train.seq_length=256"])
    assert "gpt.seq_length" in rows and rows["gpt.seq_length"][1:] == (512, 256)
    assert "dataset.sequence_length" in rows and "train.seq_length" in rows


def test_diff_catches_position_table_size_alone(default_both):
    # Same sequence length, larger position table on the MLM side only (Bridge refuses a table that differs from
    # the sequence length, and so does checks.check): only the table differs.
    mlm_side = _describe("mlm", compose(["parallel.dp=1", "model.max_position_embeddings=1024"]))
    rows = {r[0]: r for r in parity.diff(mlm_side, default_both["bridge"])}
    assert set(rows) == {"gpt.seq_length"} and rows["gpt.seq_length"][1:] == (1024, 512)
    assert checks.check(compose(["model.max_position_embeddings=1024"]))  # refused up front


def test_diff_catches_schedule(mlm_default):
    rows = _mismatch(mlm_default, ["optim.lr=1e-4"])
    assert "optimizer.lr" in rows
    lr_rows = {k for k in rows if k.startswith("schedule.lr@")}
    assert lr_rows and lr_rows <= {f"schedule.lr@{i}" for i in range(1, 11)}
    # Warmup length alone changes the trace but not the optimizer config.
    rows = _mismatch(mlm_default, ["sched.lr_warmup_iters=3"])
    assert "schedule.lr@2" in rows and not any(k.startswith("optimizer.") for k in rows)


def test_diff_catches_weight_decay_and_seed(mlm_default):
    rows = _mismatch(mlm_default, ["optim.weight_decay=0.1"])
    assert "optimizer.weight_decay" in rows and "schedule.weight_decay@1" in rows
    rows = _mismatch(mlm_default, ["data.seed=99"])
    assert set(rows) == {"dataset.random_seed"}


def test_cyclic_sampler_reaches_both_stacks_and_a_mismatch_is_caught(mlm_default):
    """data.dataloader_type=cyclic (the setting that aligns validation) drives both stacks' loaders."""
    both = describe_both(compose(["parallel.dp=1", "data.dataloader_type=cyclic"]))
    assert {side["data.dataloader_type"] for side in both.values()} == {"cyclic"}
    assert {side["data.data_sharding"] for side in both.values()} == {True}
    assert mlm_default["data.dataloader_type"] == "single"
    rows = _mismatch(mlm_default, ["data.dataloader_type=cyclic"])
    assert set(rows) == {"data.dataloader_type"} and rows["data.dataloader_type"][1:] == ("single", "cyclic")


def test_diff_catches_tp_and_dp_and_batch(mlm_default):
    rows = _mismatch(mlm_default, ["parallel.tp=2"])
    assert "transformer.tensor_model_parallel_size" in rows
    rows = _mismatch(mlm_default, ["train.micro_batch_size=2"])
    assert "train.micro_batch_size" in rows


def test_diff_catches_mlm_extra_flags():
    cfg = compose(["parallel.dp=1", "backend=mlm", "backend.extra=[--adam-beta2,0.999]"])
    both = describe_both(cfg)
    assert both["mlm"]["optimizer.adam_beta2"] == 0.999 and both["bridge"]["optimizer.adam_beta2"] == 0.95
    assert {r[0] for r in parity.diff(both["mlm"], both["bridge"])} == {"optimizer.adam_beta2"}


def test_diff_catches_bridge_extra_overrides():
    cfg = compose(["parallel.dp=1", "backend=bridge", "backend.extra=['model.bias_activation_fusion=true']"])
    both = describe_both(cfg)
    assert {r[0] for r in parity.diff(both["mlm"], both["bridge"])} == {"transformer.bias_activation_fusion"}


def test_extra_of_the_other_backend_is_ignored():
    # backend.extra belongs to the selected backend only: a Bridge override never reaches MLM's flags.
    cfg = compose(["parallel.dp=1", "backend=bridge", "backend.extra=['optimizer.adam_beta2=0.999']"])
    argv = build_argv(cfg, job_for(cfg))
    assert argv[argv.index("--adam-beta2") + 1] == "0.95" and "optimizer.adam_beta2=0.999" not in argv
    both = describe_both(cfg)
    assert (both["mlm"]["optimizer.adam_beta2"], both["bridge"]["optimizer.adam_beta2"]) == (0.95, 0.999)


def test_parity_main_reports_and_fails_on_difference(capsys):
    cfg = compose(["parallel.dp=1", "backend.extra=[--adam-beta2,0.999]"])
    assert parity.main(cfg, job_for(cfg)) == 1
    out = capsys.readouterr().out
    assert "optimizer.adam_beta2" in out and "1 of" in out and "differ" in out
    assert "backend.extra" in out  # the note that the raw flags apply to one side only
    cfg = compose(["parallel.dp=1"])
    assert parity.main(cfg, job_for(cfg)) == 0
    assert "parity: all" in capsys.readouterr().out


def test_translation_restores_global_state():
    import os
    import sys

    argv, env = list(sys.argv), dict(os.environ)
    _describe("mlm", compose(["parallel.tp=2", "parallel.dp=1"]))
    _describe("bridge", compose(["parallel.tp=2", "parallel.dp=1"]))
    assert sys.argv == argv
    assert {k: v for k, v in os.environ.items()} == env
    from megatron.training import global_vars

    assert global_vars._GLOBAL_ARGS is None


def test_mlm_parse_leaves_global_args_untouched_and_is_deterministic():
    a = native("mlm", compose(["parallel.dp=1"]))
    b = native("mlm", compose(["parallel.dp=1"]))
    assert a.argv == b.argv and vars(a.args) == vars(b.args)


def test_parity_command_end_to_end(tmp_path):
    proc = run_cli(["mode=parity"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "parity: all" in proc.stdout
    assert "fields are identical" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_parity_sweep_reports_each_point_and_fails_on_a_difference(tmp_path):
    """One line per point under its overrides, on stdout alone; the exit status is 1 when a point differs; nothing
    written (no sweep directory, no .hydra/)."""
    proc = run_cli(
        ["-m", "mode=parity", "parallel.tp=1,2", "backend=mlm", "backend.extra=choice([],[--adam-beta2,0.999])"],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    headers = [line for line in proc.stdout.splitlines() if line.startswith("# [")]
    assert len(headers) == 4 and headers[0] == "# [mode=parity parallel.tp=1 backend=mlm backend.extra=[]]", headers
    assert proc.stdout.count("fields are identical") == 2 and proc.stdout.count("parity: 1 of") == 2, proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_one_iteration_run_translates_identically():
    """train.iters=1 (warm-up 0): both stacks' schedulers yield the same lr, and every other field agrees."""
    both = describe_both(compose(["parallel.dp=1", "train.iters=1"]))
    assert parity.diff(both["mlm"], both["bridge"]) == []
    assert both["mlm"]["schedule.lr@1"] == both["bridge"]["schedule.lr@1"] > 0


def test_a_long_run_traces_a_bounded_schedule():
    """A run of 10^9 iterations: the schedule is compared at the first iterations and at as many spread up to the
    last (each stack's scheduler stepped straight there), not at every one."""
    from unified_train.backends import describe

    iters = 10**9
    both = describe_both(compose([f"train.iters={iters}", "sched.lr_warmup_iters=100"]))
    traced = describe.traced_iterations(iters)
    assert len(traced) == 2 * describe.TRACED_ITERATIONS and traced[-1] == iters
    for d in both.values():
        assert sorted(int(k.split("@")[1]) for k in d if k.startswith("schedule.lr@")) == traced
    assert both["mlm"]["schedule.lr@101"] == both["bridge"]["schedule.lr@101"] == 3e-4  # warm-up ends at 100
    assert both["mlm"][f"schedule.lr@{iters}"] == both["bridge"][f"schedule.lr@{iters}"] < 3.1e-5  # decayed to min
    assert parity.diff(both["mlm"], both["bridge"]) == []
