"""Layer specs built fresh per job: Megatron-LM's own spec selection, with our core attention swapped in.

Both stacks build their modules from the spec this returns (MLM through `GPTModelConfig.transformer_layer_spec`,
Bridge through `GPTModelProvider.transformer_layer_spec`), so the two build identical layers. Every call returns a
new spec object: both builders write `core_attention` into the spec they are given (attention_backend=local), and a
shared spec would carry one job's choice into the next.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from unified_train.kernels.attention import core_attention_class
from unified_train.kernels.mla import LocalMLASelfAttention, needs_local_mla

ATTENTION_CHOICES = ("local", "flex", "sdpa")  # local: the spec's own (DotProductAttention or TE's)


class _SpecView:
    """Presents a TransformerConfig (or a Bridge provider, which is one) as the GPTModelConfig that MLM's spec
    selection reads, with MLM's defaults for the fields outside the transformer config."""

    restore_modelopt_state = False
    use_arbitrary_attention_mask = None
    use_transformer_engine_op_fuser = False

    def __init__(self, transformer):
        self.transformer = transformer


def _transformer_config(config) -> TransformerConfig:
    """The TransformerConfig inside what a builder hands a spec function: MLM passes its GPTModelConfig, Bridge its
    provider (itself a TransformerConfig)."""
    return config if isinstance(config, TransformerConfig) else config.transformer


def layer_spec(config, vp_stage: int | None = None, attention: str = "local"):
    """A fresh layer (or block) spec from MLM's default selection (TE or local, dense or MoE block, MLA); for
    attention "flex" or "sdpa", with the core attention of every layer replaced by ours."""
    from megatron.training.models.gpt import default_layer_spec

    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTION_CHOICES}")
    transformer = _transformer_config(config)
    if attention != "local":
        _check_replaceable(transformer, attention)
    # Deep-copied because the spec builders may hand out shared sub-specs; the builders mutate what they get.
    spec = copy.deepcopy(default_layer_spec(_SpecView(transformer), vp_stage))
    if needs_local_mla(transformer):
        _use_local_mla(spec)
    if attention != "local":
        replaced = replace_core_attention(spec, core_attention_class(attention))
        if not replaced:
            raise ValueError(f"the layer spec has no core_attention to replace with {attention}")
    return spec


def local_layer_spec(config, vp_stage: int | None = None):
    """The spec's own core attention: megatron-core's DotProductAttention (local spec) or TE's (TE spec)."""
    return layer_spec(config, vp_stage, attention="local")


def flex_layer_spec(config, vp_stage: int | None = None):
    return layer_spec(config, vp_stage, attention="flex")


def sdpa_layer_spec(config, vp_stage: int | None = None):
    return layer_spec(config, vp_stage, attention="sdpa")


# config.attention -> the (config, vp_stage) spec function both builders call. Module-level functions, so that
# MLM's `--spec unified_train.kernels.spec NAME` and Bridge's config dump can name them.
SPEC_FUNCTIONS = {"local": local_layer_spec, "te": local_layer_spec, "flex": flex_layer_spec, "sdpa": sdpa_layer_spec}


def core_attention_of(spec) -> type:
    """The core-attention class the first attention of `spec` builds."""
    return next(_attention_specs(spec, set())).submodules.core_attention


def described_core_attention(spec_fn, config) -> type:
    """The core-attention class `spec_fn` gives pipeline rank 0, built outside any process group (the parity diff
    runs without one; MoE block specs otherwise ask the pipeline group for the rank)."""
    from unittest import mock

    from megatron.core import parallel_state

    with mock.patch.object(parallel_state, "get_pipeline_model_parallel_rank", lambda *args, **kwargs: 0):
        return core_attention_of(spec_fn(config, vp_stage=None))


def _check_replaceable(transformer: TransformerConfig, attention: str) -> None:
    if transformer.attention_backend == AttnBackend.local:
        # Both model builders then write DotProductAttention over the core attention of a single-layer spec.
        raise ValueError(
            f"attention={attention} needs attention_backend auto (or flash/fused/unfused), not local: "
            "with local both stacks put DotProductAttention back into the spec"
        )
    if transformer.experimental_attention_variant is not None:
        raise ValueError(
            f"attention={attention} cannot replace the core attention of the experimental variant "
            f"{transformer.experimental_attention_variant!r}"
        )
    if transformer.transformer_impl == "inference_optimized":
        raise ValueError(f"attention={attention} is for training specs, not transformer_impl=inference_optimized")


def _use_local_mla(spec) -> None:
    """Every MLASelfAttention of `spec` becomes LocalMLASelfAttention (kernels/mla.py), which megatron-core's local
    spec needs for MLA without a Q LoRA (tests/test_attention.py::test_mla_without_q_lora_builds_on_the_local_spec)."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    for attention in _attention_specs(spec, set()):
        if attention.module is MLASelfAttention:
            attention.module = LocalMLASelfAttention


def replace_core_attention(spec, cls) -> int:
    """Set `core_attention` to `cls` in every attention spec under `spec` (a layer ModuleSpec, a
    TransformerBlockSubmodules of layer specs, or anything nesting them); returns how many were set."""
    count = 0
    for attention in _attention_specs(spec, set()):
        attention.submodules.core_attention = cls
        count += 1
    return count


def _attention_specs(node, seen: set[int]):
    """Every ModuleSpec under `node` whose submodules carry a core_attention (SelfAttention, MLASelfAttention)."""
    if id(node) in seen or node is None or isinstance(node, type):
        return
    seen.add(id(node))
    if isinstance(node, ModuleSpec):
        if getattr(node.submodules, "core_attention", None) is not None:
            yield node
        yield from _attention_specs(node.submodules, seen)
    elif dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from _attention_specs(getattr(node, field.name), seen)
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _attention_specs(item, seen)
    elif isinstance(node, dict):
        for item in node.values():
            yield from _attention_specs(item, seen)
