"""Core attention of our own, a drop-in `core_attention` submodule for megatron-core 0.19 in either stack.

megatron-core's local `DotProductAttention` materialises the [b, np, sq, sk] score matrix and takes no
`k_channels`/`v_channels`, so it is slow, memory-hungry and cannot serve multi-latent attention. The two modules here
never build the score matrix and accept different q/k and v head dims:

- `FlexAttention`: torch `flex_attention`, compiled; its backward is bitwise repeatable.
- `SDPAAttention`: torch `scaled_dot_product_attention` (cuDNN, then flash, then efficient, then math); faster to
  start (nothing to compile) but its fused backwards are not deterministic.

Both take megatron's layout, q [sq, b, np, hn] and k/v [sk, b, ng, hn(_v)], and return [sq, b, np * hn_v]. Grouped
query attention is handed to the kernel (`enable_gqa`) instead of repeating K/V. What they cannot do (attention
dropout, context parallelism, packed sequences, attention bias, masks other than causal/none, sliding windows,
non-vanilla softmax, qk-clip) is refused with a ValueError at build or call time rather than silently computed
differently.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

_MASKS = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}  # mask type -> causal?

# cuDNN first: on Hopper it is the fastest and, unlike flash, has kernels for MLA's 192/128 head dims. The dispatcher
# moves down the list when a backend cannot take the inputs (head dims, GQA, dtype, device).
_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]

_compiled_flex = None


def _flex_kernel(device: torch.device):
    """flex_attention compiled once per process for accelerators. On CPU (tests only) the eager implementation is
    used: inductor's CPU flex kernel has no backward, and eager is what runs there under TORCHDYNAMO_DISABLE anyway."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type == "cpu":
        return flex_attention
    if _compiled_flex is None:
        # One fixed-shape graph per (sq, sk, heads, dims): training shapes do not change, and dynamic shapes would
        # trade kernel quality for nothing.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _causal(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def _causal_block_mask(sq: int, sk: int, device: torch.device):
    """The causal BlockMask for one (sq, sk, device), built once: building it walks the whole sq x sk grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=device)


class _CoreAttention(MegatronModule):
    """megatron-core's core-attention interface (the constructor SelfAttention and MLASelfAttention call, and the
    forward they call) over a fused torch kernel. Subclasses implement `_attend` on [b, h, s, d] tensors."""

    kind = ""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        k_channels: int | None = None,
        v_channels: int | None = None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.pg_collection = pg_collection
        if pg_collection is not None:
            self.tp_group = pg_collection.tp  # sharded_state_dict reads it (there are no parameters to shard)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self._refuse(config, dropout, attn_mask_type, layer_number)
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        # What DotProductAttention and TE use: the caller's scale (MLA passes mscale^2 / sqrt(q_head_dim), YaRN's
        # correction included), else 1/sqrt(q/k head dim). apply_query_key_layer_scaling is not applied:
        # DotProductAttention divides the scale by layer_number and its softmax multiplies it back, which changes
        # nothing but fp16 overflow in a materialised score matrix; these kernels accumulate scores in fp32.
        # For the same reason attention_softmax_in_fp32 has no counterpart: the softmax is always fp32 here, where
        # DotProductAttention in bf16 with attention_softmax_in_fp32=False runs it in bf16.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)

    def _refuse(self, config, dropout: float, attn_mask_type: AttnMaskType, layer_number: int) -> None:
        name = f"{self.kind} core attention"
        if dropout:
            raise ValueError(f"{name} cannot drop attention probabilities: set attention_dropout=0.0 (got {dropout}).")
        if config.context_parallel_size > 1:
            raise ValueError(
                f"{name} does not support context parallelism (context_parallel_size={config.context_parallel_size})."
            )
        if attn_mask_type not in _MASKS:
            raise ValueError(f"{name} supports causal and no_mask attention, not {attn_mask_type.name}.")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(f"{name} does not support sliding-window attention (window_size={config.window_size}).")
        if config.softmax_type != "vanilla":
            raise ValueError(f"{name} supports softmax_type='vanilla' only (got {config.softmax_type!r}).")
        if config.qk_clip or config.log_max_attention_logit:
            raise ValueError(f"{name} does not report max attention logits (qk_clip / log_max_attention_logit).")

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """q [sq, b, np, hn], k [sk, b, ng, hn], v [sk, b, ng, hn_v] -> [sq, b, np * hn_v]. The attention_mask is
        not read: causal masking is the kernel's (as with TE for causal)."""
        if packed_seq_params is not None:
            raise ValueError(f"{self.kind} core attention does not support packed sequences (packed_seq_params).")
        if attention_bias is not None:
            raise ValueError(f"{self.kind} core attention does not support attention_bias.")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = self._is_causal(mask_type, query.size(0), key.size(0))
        if attention_mask is not None and not causal:
            # A causal mask tensor is the kernel's own mask; any other would be dropped silently.
            raise ValueError(f"{self.kind} core attention takes no attention_mask tensor without a causal mask type.")
        # [s, b, h, d] -> [b, h, s, d]: a view; both kernels take any strides with a unit last dim.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._attend(q, k, v, causal)
        sq, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _is_causal(self, mask_type: AttnMaskType, sq: int, sk: int) -> bool:
        if mask_type not in _MASKS:
            raise ValueError(f"{self.kind} core attention supports causal and no_mask attention, not {mask_type.name}.")
        causal = _MASKS[mask_type]
        if causal and sq != sk:
            # Both kernels align a causal mask top-left, which is wrong for a query block that ends a longer key
            # sequence (a KV cache); training never has one.
            raise ValueError(f"{self.kind} core attention needs sq == sk for causal attention (got {sq} and {sk}).")
        return causal

    def _attend(self, q, k, v, causal: bool):
        raise NotImplementedError


class FlexAttention(_CoreAttention):
    """torch flex_attention with a cached causal BlockMask; deterministic forward and backward."""

    kind = "flex"

    def _attend(self, q, k, v, causal: bool):
        block_mask = _causal_block_mask(q.size(2), k.size(2), q.device) if causal else None
        return _flex_kernel(q.device)(
            q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=q.size(1) != k.size(1)
        )


class SDPAAttention(_CoreAttention):
    """torch scaled_dot_product_attention; the fused backwards (cuDNN, flash, efficient) are not deterministic."""

    kind = "sdpa"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.deterministic_mode:
            raise ValueError("sdpa core attention is not deterministic in backward: use flex with deterministic_mode.")

    def _attend(self, q, k, v, causal: bool):
        with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=q.size(1) != k.size(1)
            )


CORE_ATTENTION = {"flex": FlexAttention, "sdpa": SDPAAttention}


def core_attention_class(name: str) -> type[_CoreAttention]:
    """The core-attention class registered under `name`."""
    try:
        return CORE_ATTENTION[name]
    except KeyError:
        raise ValueError(f"unknown core attention {name!r}; choose one of {sorted(CORE_ATTENTION)}") from None
