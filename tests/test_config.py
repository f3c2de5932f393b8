"""The composed config, presets, derived values and schema validation (no torch, no megatron)."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from ut_helpers import CONF, PRESETS, compose

from unified_train import checks, rundir
from unified_train import config as C


@pytest.fixture(scope="module")
def default_cfg():
    return compose()


def test_default_config_is_bridge_vanilla(default_cfg):
    cfg = default_cfg
    assert cfg.backend.name == "mlm"
    m = cfg.model
    assert (m.name, m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (
        "vanilla_gpt",
        2,
        256,
        4,
        1024,
    )
    assert (cfg.train.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.iters) == (
        512,
        4,
        32,
        10,
    )
    assert cfg.precision.dtype == "bf16"
    assert cfg.data.type == "mock"
    assert cfg.rng.seed == 1234
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.min_lr == pytest.approx(3e-5)
    assert cfg.sched.lr_decay_style == "cosine"
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 1 and cfg.parallel.sequence_parallel is False
    assert checks.check(cfg) == []


def test_config_has_the_required_groups():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert {
        "backend",
        "model",
        "parallel",
        "train",
        "optim",
        "sched",
        "data",
        "precision",
        "checkpoint",
        "validation",
        "logger",
        "rng",
        "determinism",
    } <= groups
    assert {p.stem for p in (CONF / "backend").glob("*.yaml")} == {"mlm", "bridge"}
    assert {"mock", "indexed"} <= {p.stem for p in (CONF / "data").glob("*.yaml")}
    assert {"vanilla_gpt", "llama32_1b", "llama3_8b", "qwen3_8b", "deepseek_v2_lite"} <= set(PRESETS)


def test_backend_group_selects_backend():
    assert compose(["backend=bridge"]).backend.name == "bridge"


_MODEL_FIELDS = {f.name for f in dataclasses.fields(C.ModelConfig)}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_architecture_keys_only(preset):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{preset}.yaml"))
    assert raw["name"] == preset
    assert set(raw) <= _MODEL_FIELDS, f"non-architecture keys in {preset}.yaml: {set(raw) - _MODEL_FIELDS}"
    cfg = compose([f"model={preset}"])
    assert cfg.model.name == preset
    for key, value in raw.items():  # the preset's values reach the composed config unchanged
        assert cfg.model[key] == value, key
    # Everything outside `model` is unaffected by the preset.
    base = compose()
    for group in ("train", "optim", "sched", "parallel", "data", "rng", "precision"):
        assert cfg[group] == base[group], group


def test_moe_and_mla_presets():
    ds = compose(["model=deepseek_v2_lite"]).model
    assert ds.num_experts == 64 and ds.multi_latent_attention is True and ds.moe_first_dense_layers == 1
    llama = compose(["model=llama32_1b"]).model
    assert llama.num_query_groups == 8 and llama.activation == "swiglu" and llama.position_embedding_type == "rope"


@pytest.mark.parametrize("iters, warmup", [(1, 0), (10, 1), (25, 2), (1000, 100), (5000, 500), (10000, 500)])
def test_warmup_is_derived(iters, warmup):
    cfg = compose([f"train.iters={iters}"])
    assert C.warmup_iters(cfg) == warmup
    assert C.decay_iters(cfg) == iters


def test_long_run_derivations():
    cfg = compose(["train.iters=10000"])
    assert C.warmup_iters(cfg) == 500
    assert C.decay_iters(cfg) == 10000
    assert C.eval_interval(cfg) == 500


def test_short_run_derivations(default_cfg):
    assert C.warmup_iters(default_cfg) == 1
    assert C.decay_iters(default_cfg) == 10
    assert C.eval_interval(default_cfg) == 10
    assert C.warmup_iters(default_cfg) < C.decay_iters(default_cfg)  # MLM asserts warmup < decay


def test_explicit_schedule_wins():
    cfg = compose(
        ["train.iters=100", "sched.lr_warmup_iters=7", "sched.lr_decay_iters=80", "validation.eval_interval=25"]
    )
    assert (C.warmup_iters(cfg), C.decay_iters(cfg), C.eval_interval(cfg)) == (7, 80, 25)


def test_explicit_warmup_not_below_decay_is_rejected():
    cfg = compose(["sched.lr_warmup_iters=10"])
    errors = checks.check(cfg)
    assert len(errors) == 1 and errors[0].startswith("sched.lr_warmup_iters=10")


def test_data_seed_follows_rng_seed():
    assert C.data_seed(compose()) == 1234
    assert C.data_seed(compose(["rng.seed=42"])) == 42
    cfg = compose(["rng.seed=42", "data.seed=7"])
    assert C.data_seed(cfg) == 7 and cfg.rng.seed == 42


def test_position_table_follows_seq_length():
    assert C.position_table_size(compose()) == 512
    assert C.position_table_size(compose(["train.seq_length=1024"])) == 1024
    cfg = compose(["train.seq_length=256", "model.max_position_embeddings=2048"])
    assert C.position_table_size(cfg) == 2048


def test_ffn_defaults_to_4h():
    assert C.ffn_hidden_size(compose(["model=gpt_125m"])) == 4 * 768
    assert C.ffn_hidden_size(compose()) == 1024


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.foo=1", "train.foo"),
        ("model.hiddden_size=128", "model.hiddden_size"),
        ("optim.beta2=0.9", "optim.beta2"),
    ],
)
def test_typo_key_fails_at_compose(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert key in str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.iters=abc", "train.iters"),
        ("model.hidden_size=1.5", "model.hidden_size"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("optim.lr=fast", "optim.lr"),
    ],
)
def test_wrong_type_fails_at_compose(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert isinstance(info.value.__cause__, ValidationError)
    assert info.value.__cause__.full_key == key


def test_unknown_group_option_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose(["model=no_such_model"])


def test_schema_rejects_new_keys_in_struct_mode(default_cfg):
    from omegaconf.errors import ConfigAttributeError

    with pytest.raises(ConfigAttributeError):
        default_cfg.train.not_a_field = 1


def test_pair_id_ignores_backend_but_not_numerics():
    mlm, bridge = compose(["backend=mlm"]), compose(["backend=bridge"])
    assert rundir.pair_id(mlm) == rundir.pair_id(bridge)
    assert rundir.pair_id(mlm) != rundir.pair_id(compose(["optim.adam_beta2=0.999"]))


def test_a_one_iteration_run_is_valid_and_gets_no_warmup():
    """The obvious smoke test, `train.iters=1`: the derived warm-up stays below the decay length."""
    cfg = compose(["train.iters=1"])
    assert checks.check(cfg) == []
    assert (C.warmup_iters(cfg), C.decay_iters(cfg)) == (0, 1)
    assert C.warmup_iters(compose(["train.iters=10"])) == 1 and C.warmup_iters(compose(["train.iters=9000"])) == 500
    assert checks.check(compose(["train.iters=1", "sched.lr_warmup_iters=1"])) == [
        "sched.lr_warmup_iters=1 must be below the decay length 1: set sched.lr_warmup_iters=null to derive it"
    ]
