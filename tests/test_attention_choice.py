"""kernels.attention: one knob, resolved once, translated into the layer spec both stacks build; what cannot run is
refused up front. (The kernels themselves are tested in test_attention.py.)"""

from __future__ import annotations

import json

import pytest
from ut_helpers import compose, describe_both, job_for, native, run_cli

from unified_train import checks, config, rundir
from unified_train.modes import export, parity

LLAMA = ["model=llama32_1b", "model.num_layers=2", "parallel.dp=1"]
DEEPSEEK = ["model=deepseek_v2_lite", "model.num_layers=4", "parallel.dp=1"]
CLASSES = {
    "local": "megatron.core.transformer.dot_product_attention.DotProductAttention",
    "flex": "unified_train.kernels.attention.FlexAttention",
    "sdpa": "unified_train.kernels.attention.SDPAAttention",
}


@pytest.mark.parametrize(
    ("overrides", "resolved"),
    [
        ([], "local"),  # vanilla_gpt has attention dropout 0.1, which flex cannot apply
        (["model.attention_dropout=0.0"], "flex"),
        (LLAMA, "flex"),
        (DEEPSEEK, "flex"),  # multi-latent attention: local cannot build it
        ([*LLAMA, "parallel.cp=2"], "local"),
        ([*LLAMA, "kernels.attention_backend=local"], "local"),
        ([*LLAMA, "kernels.attention=sdpa"], "sdpa"),
        ([*LLAMA, "kernels.attention=local"], "local"),
    ],
)
def test_auto_resolves_to_flex_where_it_applies(overrides, resolved):
    cfg = compose(overrides)
    assert config.attention(cfg) == resolved
    assert rundir.identity(cfg, world_size=1).attention == resolved  # what run.json records


@pytest.mark.parametrize("choice", ["local", "flex", "sdpa"])
def test_both_stacks_build_the_chosen_core_attention(choice):
    both = describe_both(compose([*LLAMA, f"kernels.attention={choice}"]))
    assert both["mlm"]["kernels.core_attention"] == both["bridge"]["kernels.core_attention"] == CLASSES[choice]
    assert parity.diff(both["mlm"], both["bridge"]) == []


def test_mla_and_moe_pair_builds_flex_on_both_sides():
    both = describe_both(compose(DEEPSEEK))
    assert both["mlm"]["kernels.core_attention"] == both["bridge"]["kernels.core_attention"] == CLASSES["flex"]
    assert both["mlm"]["transformer.multi_latent_attention"] is True
    assert parity.diff(both["mlm"], both["bridge"]) == []


def test_a_one_sided_spec_shows_in_the_parity_diff():
    """The diff compares the class each stack builds, not the knob: a spec forced on MLM alone is caught."""
    cfg = compose([*LLAMA, "backend=mlm", "backend.extra=[--spec,unified_train.kernels.spec,sdpa_layer_spec]"])
    both = describe_both(cfg)
    rows = {r[0]: r for r in parity.diff(both["mlm"], both["bridge"])}
    assert rows == {"kernels.core_attention": ("kernels.core_attention", CLASSES["sdpa"], CLASSES["flex"])}


def test_mlm_gets_the_spec_as_a_flag_and_bridge_as_code():
    cfg = compose(LLAMA)
    mlm, bridge = native("mlm", cfg), native("bridge", cfg)
    assert mlm.argv[mlm.argv.index("--spec") + 1 :][:2] == ["unified_train.kernels.spec", "flex_layer_spec"]
    assert bridge.container.model.transformer_layer_spec.__name__ == "flex_layer_spec"
    text = export.render(cfg, job_for(cfg))
    assert "--spec unified_train.kernels.spec flex_layer_spec" in text
    assert (
        "#   and in its Python: from unified_train.kernels.spec import flex_layer_spec; "
        "cfg.model.transformer_layer_spec = flex_layer_spec"
    ) in text
    # The local spec is MLM's default: no flag, so upstream's pretrain_gpt.py needs nothing of ours.
    assert "--spec" not in native("mlm", compose(["parallel.dp=1"])).argv


def test_run_json_records_the_attention(tmp_path):
    cfg = compose(LLAMA)
    rundir.write_job_record(cfg, job_for(cfg, tmp_path / "job"))
    assert json.loads((tmp_path / "job" / rundir.RUN_JSON).read_text())["attention"] == "flex"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["kernels.attention=flex"],
            "kernels.attention=flex with model.attention_dropout=0.1: flex and sdpa cannot "
            "drop attention probabilities; set model.attention_dropout=0.0",
        ),
        (
            [*LLAMA, "kernels.attention=flex", "parallel.cp=2", "train.seq_length=512"],
            "kernels.attention=flex with parallel.cp=2: our core attention has no context-parallel exchange; set "
            "parallel.cp=1",
        ),
        (
            [*LLAMA, "kernels.attention=sdpa", "determinism=strict"],
            "kernels.attention=sdpa is not deterministic in its backward (cuDNN, flash): use kernels.attention=flex "
            "with determinism=strict",
        ),
        (
            [*DEEPSEEK, "kernels.attention=local"],
            "model.multi_latent_attention=true cannot run on kernels.attention=local: megatron-core's local "
            "DotProductAttention has no separate key/value head sizes; use kernels.attention=flex",
        ),
        (
            [*LLAMA, "kernels.attention=flex", "kernels.attention_backend=local"],
            "kernels.attention=flex with kernels.attention_backend=local: it selects megatron-core's "
            "DotProductAttention; set kernels.attention_backend=auto",
        ),
    ],
    ids=["dropout", "cp", "sdpa-deterministic", "mla-local", "backend-local"],
)
def test_what_cannot_run_is_refused_in_one_line(overrides, line, tmp_path):
    assert checks.check(compose(overrides)) == [line]
    proc = run_cli(["mode=parity", *overrides], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"unified_train: {line}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(config.te_installed(), reason="Transformer Engine is installed here")
def test_te_attention_needs_transformer_engine():
    assert checks.check(compose(["kernels.attention=te"])) == [
        "kernels.attention=te needs Transformer Engine's layer spec: install unified-train[te] and set "
        "kernels.transformer_impl=auto, or choose kernels.attention=flex"
    ]


def test_local_attention_under_te_spec_is_refused(monkeypatch):
    """TE's layer spec builds TE's attention: `local` there would run it while run.json said local."""
    monkeypatch.setattr(config, "transformer_impl", lambda cfg: "transformer_engine")
    assert checks.kernels(compose([*LLAMA, "kernels.attention=local"])) == [
        "kernels.attention=local is megatron-core's DotProductAttention, which the local layer spec builds: set "
        "kernels.transformer_impl=local, or kernels.attention=te for Transformer Engine's"
    ]
    assert config.attention(compose(LLAMA)) == "te"  # auto follows the installed spec


def test_pair_id_follows_the_resolved_attention(monkeypatch):
    """Both halves of a pair run the same kernel: the pair id hashes what auto resolves to on the job's host."""
    auto, explicit = compose(LLAMA), compose([*LLAMA, "kernels.attention=flex"])
    assert rundir.pair_id(auto) == rundir.pair_id(explicit)
    assert rundir.pair_id(auto) != rundir.pair_id(compose([*LLAMA, "kernels.attention=sdpa"]))
    monkeypatch.setattr(config, "transformer_impl", lambda cfg: "transformer_engine")  # a host with TE
    assert rundir.pair_id(auto) != rundir.pair_id(explicit)
