"""The stacks' own rules, run up front: a config our checks pass is built as each job would build it (MLM's
parse_args and validate_args, Bridge's overrides and ConfigContainer.validate), and what a stack raises becomes one
line naming our key, found from the translation itself (mcore_fields.unified_keys), exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
from ut_helpers import compose, run_cli

from unified_train import app, mcore_fields


@pytest.mark.parametrize(
    "megatron_fields, keys",
    [
        (["ckpt_format"], ["checkpoint.format"]),
        (["lr"], ["optim.lr"]),
        (["num_layers"], ["model.num_layers"]),
        (["expert_tensor_parallel_size"], ["parallel.tp", "parallel.etp"]),
        (["lr_warmup_iters"], ["train.iters", "sched.lr_warmup_iters"]),
    ],
)
def test_megatron_fields_lead_back_to_our_keys(megatron_fields, keys):
    assert mcore_fields.unified_keys(compose(), megatron_fields) == keys


def test_a_rule_only_megatron_lm_has_names_our_keys():
    cfg = compose(["kernels.cross_entropy_loss_fusion=true", "kernels.cross_entropy_fusion_impl=te"])
    line = app.stack_problem(cfg)
    assert line.startswith("kernels.cross_entropy_loss_fusion, kernels.cross_entropy_fusion_impl: Megatron-LM refuses")
    assert "stability issues" in line and "\n" not in line


@pytest.mark.parametrize(
    "overrides, stack, words",
    [
        (["backend.extra=[--bogus-flag]"], "Megatron-LM", "unrecognized arguments: --bogus-flag"),
        (["backend.extra=[--ckpt-format,bogus]"], "Megatron-LM", "argument --ckpt-format: invalid choice: 'bogus'"),
        (["backend=bridge", "backend.extra=['model.bogus=1']"], "Megatron-Bridge", "Could not override 'model.bogus'"),
    ],
)
def test_a_bad_pass_through_is_one_line_naming_backend_extra(overrides, stack, words):
    line = app.stack_problem(compose(overrides))
    assert line.startswith(f"backend.extra: {stack} refuses it: ") and words in line and "\n" not in line


def test_accepted_configs_pass():
    assert app.stack_problem(compose()) is None
    # In the job's environment: Bridge's validation reads NCCL_ALGO, which determinism=strict sets.
    assert app.stack_problem(compose(["backend=bridge", "determinism=strict"])) is None
    assert app.stack_problem(compose(["backend=bridge", "model=llama32_1b", "model.num_layers=2"])) is None


def test_the_command_line_refuses_it_before_anything_is_written(tmp_path):
    proc = run_cli(
        ["-m", "mode=parity", "backend=mlm,bridge", "kernels.cross_entropy_fusion_impl=te"], cwd=tmp_path, timeout=600
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("unified_train:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("unified_train: [mode=parity backend=mlm kernels.cross_entropy_fusion_impl=te] kernels.")
    assert os.listdir(tmp_path) == []
