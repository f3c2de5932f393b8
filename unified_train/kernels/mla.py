"""Multi-latent attention on the local (non-TE) layer spec, for models without a Q LoRA (DeepSeek-V2-Lite).

With qk_layernorm on and q_lora_rank None, megatron-core 0.19.2's MLA puts the Q norm in front of the Q projection
as one fused norm+linear module, and only Transformer Engine provides one (transformer/mla_qk_norm_config.py: the
local backend's `column_parallel_layer_norm_linear()` is None, so the local spec cannot build the model at all).
Here the same computation is built from torch modules: Q = linear_q_proj(norm(h)), and the KV latent norm as its
own module before linear_kv_up_proj, which is what TE's fused modules compute.
"""

from __future__ import annotations

from megatron.core.models.backends import get_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class NormColumnParallelLinear(MegatronModule):
    """A norm over the input, then a column-parallel linear: TE's LayerNormColumnParallelLinear, unfused. The norm
    follows config.normalization and config.layernorm_epsilon, as TE's does."""

    def __init__(self, input_size: int, output_size: int, *, config, **linear_kwargs):
        super().__init__(config=config)
        self.norm = WrappedTorchNorm(config=config, hidden_size=input_size, eps=config.layernorm_epsilon)
        self.linear = ColumnParallelLinear(input_size, output_size, config=config, **linear_kwargs)

    def forward(self, hidden_states):
        return self.linear(self.norm(hidden_states))


class LocalMLASelfAttention(MLASelfAttention):
    """MLASelfAttention that resolves a Q norm without a Q LoRA to NormColumnParallelLinear where the backend has
    no fused norm+linear; every other case is megatron-core's own resolution."""

    def _resolve_qk_norm_config(self, submodules):
        c = self.config
        fused = get_backend(c.transformer_impl).column_parallel_layer_norm_linear()
        if not c.qk_layernorm or c.q_lora_rank is not None or fused is not None:
            return super()._resolve_qk_norm_config(submodules)
        return {
            "linear_q_proj": NormColumnParallelLinear,
            "linear_q_up_proj": IdentityOp,
            "linear_kv_up_proj": submodules.linear_kv_up_proj,
            "q_layernorm": IdentityOp,
            "kv_layernorm": submodules.kv_layernorm,
        }


def needs_local_mla(config) -> bool:
    """The layout megatron-core's local spec cannot build (see the module docstring)."""
    return bool(
        config.multi_latent_attention
        and config.qk_layernorm
        and config.q_lora_rank is None
        and config.transformer_impl == "local"
    )
