"""unified_train.kernels: our core attention (flex, sdpa) against a float64 softmax reference, what it refuses,
and the layer specs that carry it into megatron-core models (dense, MoE, MLA), on CPU.

torch 2.11 refuses flex_attention backward on CPU outright (a device check in front of the kernel); the tests lift
that check to run flex's eager implementation, which is what the module's CPU path calls. The compiled GPU kernel is
the same operator with the same inputs, so the layout, scale, GQA and mask handling tested here are what runs there.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from unified_train.kernels import attention, spec
from unified_train.runtime import ranks

KINDS = ("flex", "sdpa")
# (heads, query groups, q/k head dim, v head dim): multi-head, grouped-query, MLA-like (q/k dim != v dim).
HEADS = {"mha": (4, 4, 16, 16), "gqa": (8, 2, 16, 16), "mla": (4, 4, 24, 16)}
MAX_REL = {}  # worst relative error seen per (kind, dtype), reported at the end of the module


@pytest.fixture(autouse=True)
def flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    print("\nmax relative error:", {f"{k}/{d}": f"{e:.2e}" for (k, d), e in sorted(MAX_REL.items())})


def _config(heads=4, groups=4, head_dim=16, **overrides):
    fields = dict(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        transformer_impl="local",
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _module(kind, config, mask=AttnMaskType.causal, **kwargs):
    cls = attention.core_attention_class(kind)
    return cls(
        config=config,
        layer_number=1,
        attn_mask_type=mask,
        attention_type="self",
        cp_comm_type=None,
        pg_collection=None,
        **kwargs,
    )


def _reference(q, k, v, scale, causal=True):
    """softmax(q k^T * scale + causal mask) v on float64 inputs (differentiable), GQA by repeating K/V; megatron
    layouts in ([s, b, h, d]) and out ([s, b, h * dv])."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    repeat = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)


def _inputs(s, b, heads, groups, dk, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, dk, generator=gen)
    k = torch.randn(s, b, groups, dk, generator=gen)
    v = torch.randn(s, b, groups, dv, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _rel(x, ref):
    """||x - ref|| / ||ref||; where ref is exactly zero (dq, dk with a single key), the RMS of x instead."""
    diff = (x.double() - ref).norm()
    scale = ref.norm() if ref.norm() > 0 else torch.tensor(float(ref.numel())).sqrt()
    return (diff / scale).item()


def _check(kind, shape, s, b, dtype, tol, causal=True):
    heads, groups, dk, dv = HEADS[shape]
    config = _config(heads, groups, dk, bf16=dtype == torch.bfloat16)
    kwargs = dict(k_channels=dk, v_channels=dv, softmax_scale=0.7 / math.sqrt(dk)) if shape == "mla" else {}
    module = _module(kind, config, AttnMaskType.causal if causal else AttnMaskType.no_mask, **kwargs)
    scale = kwargs.get("softmax_scale", 1 / math.sqrt(dk))
    assert module.softmax_scale == pytest.approx(scale)
    q, k, v = _inputs(s, b, heads, groups, dk, dv, dtype)
    out = module(q, k, v, None, attn_mask_type=None, attention_bias=None, packed_seq_params=None)
    assert out.shape == (s, b, heads * dv) and out.dtype == dtype
    # The reference's own graph gives the reference gradients for the same upstream gradient.
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(qr, kr, vr, scale, causal)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad)
    ref.backward(grad.double())
    errors = [_rel(out, ref.detach())] + [_rel(t.grad, r.grad) for t, r in ((q, qr), (k, kr), (v, vr))]
    key = (kind, str(dtype).removeprefix("torch."))
    MAX_REL[key] = max(MAX_REL.get(key, 0.0), *errors)
    assert max(errors) < tol, dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", sorted(HEADS))
@pytest.mark.parametrize("s,b", [(1, 1), (17, 2), (64, 1), (128, 2)])
def test_matches_the_float64_reference_fp32(kind, shape, s, b):
    _check(kind, shape, s, b, torch.float32, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_matches_the_float64_reference_bf16(kind, shape):
    _check(kind, shape, 64, 2, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_no_mask_is_full_attention(kind):
    _check(kind, "gqa", 17, 2, torch.float32, 1e-5, causal=False)


def test_reference_is_causal():
    """The reference itself: changing a later key leaves earlier outputs unchanged."""
    q, k, v = (t.detach().double() for t in _inputs(8, 1, 2, 2, 4, 4, torch.float32))
    out = _reference(q, k, v, 0.5)
    k2 = k.clone()
    k2[5:] += 1.0
    out2 = _reference(q, k2, v, 0.5)
    assert torch.equal(out[:5], out2[:5]) and not torch.equal(out[5:], out2[5:])


def test_default_scale_follows_k_channels_like_te():
    module = _module("flex", _config(4, 4, 16), k_channels=24, v_channels=16)
    assert module.softmax_scale == pytest.approx(1 / math.sqrt(24))
    assert _module("sdpa", _config(4, 4, 16)).softmax_scale == pytest.approx(1 / math.sqrt(16))


# --- what is refused -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_attention_dropout_is_refused(kind):
    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        _module(kind, _config(attention_dropout=0.1))
    with pytest.raises(ValueError, match="attention_dropout"):
        _module(kind, _config(), attention_dropout=0.1)
    _module(kind, _config(attention_dropout=0.1), attention_dropout=0.0)  # the caller's value wins, as in mcore


@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequences_and_bias_are_refused(kind):
    from megatron.core.packed_seq_params import PackedSeqParams

    module = _module(kind, _config())
    q, k, v = _inputs(4, 1, 4, 4, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="packed"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="attention_mask"):  # a mask tensor the kernel would not apply
        module(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), attn_mask_type=AttnMaskType.no_mask)


def test_other_masks_context_parallel_and_sdpa_determinism_are_refused():
    with pytest.raises(ValueError, match="padding"):
        _module("flex", _config(), mask=AttnMaskType.padding)
    module = _module("flex", _config())
    q, k, v = _inputs(4, 1, 4, 4, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="arbitrary"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.arbitrary)
    with pytest.raises(ValueError, match="sq == sk"):
        module(q[:2], k, v, None)
    config = _config()
    config.context_parallel_size = 2  # set after validation: TransformerConfig checks it against the world
    with pytest.raises(ValueError, match="context parallelism"):
        _module("sdpa", config)
    with pytest.raises(ValueError, match="deterministic"):
        _module("sdpa", _config(deterministic_mode=True))
    _module("flex", _config(deterministic_mode=True))
    with pytest.raises(ValueError, match="unknown core attention"):
        attention.core_attention_class("xformers")


# --- layer specs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_parallel():
    """A world of one (gloo) with megatron's model-parallel state: block specs ask for the pipeline rank, and the
    models ask for their process groups. Torn down after this module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(ranks.free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def cuda_is_cpu(monkeypatch):
    """megatron-core places some buffers (rotary frequencies) on torch.cuda.current_device() whatever
    use_cpu_initialization says; on this CPU-only test machine that device is the CPU."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def _dense(**overrides):
    return _config(8, 2, 8, num_layers=2, ffn_hidden_size=128, **overrides)


def _moe():
    return _dense(num_moe_experts=4, moe_layer_freq=[0, 1], moe_router_topk=2, moe_ffn_hidden_size=32)


def _mla(**overrides):
    fields = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        transformer_impl="local",
        multi_latent_attention=True,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rope_type="rope",
        ffn_hidden_size=128,
    )
    fields.update(overrides)
    return MLATransformerConfig(**fields)


def _layers(s):
    return getattr(s, "layer_specs", None) or [s]


def _core(layer):
    return layer.submodules.self_attention.submodules.core_attention


@pytest.mark.parametrize("make", [_dense, _moe, _mla], ids=["dense", "moe", "mla"])
@pytest.mark.parametrize("kind", KINDS)
def test_spec_replaces_core_attention_in_every_layer(model_parallel, make, kind):
    s = spec.layer_spec(make(), attention=kind)
    layers = _layers(s)
    assert len(layers) == (2 if make is _moe else 1)
    assert all(_core(layer) is attention.CORE_ATTENTION[kind] for layer in layers)
    if make is _mla:
        from megatron.core.transformer.multi_latent_attention import MLASelfAttention

        assert layers[0].submodules.self_attention.module is MLASelfAttention


def test_spec_is_fresh_each_call(model_parallel):
    for make in (_dense, _moe):
        first, second = spec.layer_spec(make(), attention="flex"), spec.layer_spec(make(), attention="flex")
        for a, b in zip(_layers(first), _layers(second), strict=True):
            assert a is not b and a.submodules.self_attention is not b.submodules.self_attention
            assert a.submodules.self_attention.submodules is not b.submodules.self_attention.submodules
        _layers(first)[0].submodules.self_attention.submodules.core_attention = object
        assert _core(_layers(second)[0]) is attention.FlexAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    assert _core(spec.layer_spec(_dense())) is DotProductAttention  # local: the spec's own, untouched by flex calls


def test_spec_takes_mlm_and_bridge_configs_and_refuses_local_backend(model_parallel):
    import inspect

    from megatron.core.transformer.enums import AttnBackend
    from megatron.training.models.gpt import GPTModelConfig

    fn = spec.SPEC_FUNCTIONS["sdpa"]
    assert "vp_stage" in inspect.signature(fn).parameters  # both builders then pass vp_stage
    assert _core(fn(GPTModelConfig(transformer=_dense(), vocab_size=128), vp_stage=None)) is attention.SDPAAttention
    with pytest.raises(ValueError, match="attention_backend"):
        spec.layer_spec(_dense(attention_backend=AttnBackend.local), attention="flex")
    with pytest.raises(ValueError, match="unknown attention"):
        spec.layer_spec(_dense(), attention="fa3")


def test_mla_builds_our_core_attention_with_its_head_dims_and_scale(model_parallel, cuda_is_cpu):
    """MLASelfAttention hands k_channels/v_channels and its mscale-corrected softmax_scale to core_attention,
    which megatron-core's DotProductAttention cannot take."""
    from megatron.core.transformer.spec_utils import build_module

    config = _mla(rope_type="yarn", rotary_scaling_factor=40.0, mscale_all_dim=1.0)
    layer = build_module(spec.layer_spec(config, attention="flex"), config=config, layer_number=1)
    core = layer.self_attention.core_attention
    assert isinstance(core, attention.FlexAttention)
    assert (core.k_channels, core.v_channels) == (24, 16)
    assert core.softmax_scale == pytest.approx(layer.self_attention.softmax_scale)
    assert core.softmax_scale != pytest.approx(1 / math.sqrt(24))  # the YaRN mscale is in it


# --- a whole model -------------------------------------------------------------------------------------------------


def _gpt(config, kind):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec.layer_spec(config, attention=kind),
        vocab_size=128,
        max_sequence_length=32,
        position_embedding_type="rope",
    )


def test_mla_without_q_lora_builds_on_the_local_spec(model_parallel, cuda_is_cpu):
    """DeepSeek-V2-Lite's layout (q_lora_rank None, qk_layernorm on) cannot be built from megatron-core's own local
    spec; ours builds it, with the Q norm in front of the Q projection (as TE's fused module) and the KV latent norm,
    and it runs forward and backward."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from unified_train.kernels.mla import LocalMLASelfAttention, NormColumnParallelLinear

    config = _mla(qk_layernorm=True, normalization="RMSNorm")
    upstream = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    upstream.submodules.self_attention.submodules.core_attention = attention.FlexAttention
    with pytest.raises(ValueError, match="q_lora_rank is None"):
        build_module(upstream, config=config, layer_number=1)
    layer = build_module(spec.layer_spec(config, attention="flex"), config=config, layer_number=1)
    mla = layer.self_attention
    assert isinstance(mla, LocalMLASelfAttention) and isinstance(mla.linear_q_proj, NormColumnParallelLinear)
    assert isinstance(mla.kv_layernorm, torch.nn.RMSNorm)
    hidden = torch.randn(16, 2, config.hidden_size, requires_grad=True)
    q_in = torch.randn(5, config.hidden_size)
    expected = torch.nn.functional.linear(mla.linear_q_proj.norm(q_in), mla.linear_q_proj.linear.weight)
    assert torch.equal(mla.linear_q_proj(q_in)[0], expected)
    out, _ = layer(hidden, attention_mask=None)
    out.float().sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert mla.linear_q_proj.norm.weight.grad is not None  # the Q norm is in the graph


@pytest.mark.parametrize("make", [_dense, _mla], ids=["dense", "mla"])
def test_gpt_model_forward_backward_agrees_between_kernels(model_parallel, cuda_is_cpu, make):
    """A megatron-core GPTModel built from our spec trains on CPU; flex and sdpa models with the same weights give
    the same loss and gradients."""
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(32).expand(2, 32)
    models = {kind: _gpt(make(), kind) for kind in KINDS}
    models["sdpa"].load_state_dict(models["flex"].state_dict())
    for kind, model in models.items():
        assert all(
            isinstance(layer.self_attention.core_attention, attention.CORE_ATTENTION[kind])
            for layer in model.decoder.layers
        )
    results = {}
    for kind, model in models.items():
        loss = model(tokens, position_ids, None, labels=tokens).mean()
        loss.backward()
        results[kind] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert math.isfinite(results["flex"][0])
    assert results["flex"][0] == pytest.approx(results["sdpa"][0], rel=1e-6)
    errors = {name: _rel(results["sdpa"][1][name], grad.double()) for name, grad in results["flex"][1].items()}
    MAX_REL[("gpt-model flex-vs-sdpa grads", make.__name__.strip("_"))] = max(errors.values())
    assert max(errors.values()) < 1e-5, errors
