"""Scaled-dot-product attention for the local (CPU) models that keeps grouped-query heads grouped.

transformers' ``sdpa`` attention passes ``enable_gqa=True`` to torch's ``scaled_dot_product_attention`` only
when there is no attention mask (`transformers.integrations.sdpa_attention.use_gqa_in_sdpa`); with a padding
mask, which every batched generation and policy forward here has, it first copies the keys and values of
each KV head once per query head it serves (``repeat_kv``). At a decoding step that copy is of the whole
KV cache, and it and the attention over the copies were a third of a tiny model's evaluation on CPU
(docs/findings/2026-12-05-cpu-study.md). torch's CPU kernels take grouped heads with a mask directly; the
output is the same (bit for bit in `tests/test_attention.py`).

`register` adds the implementation under `ATTN_IMPLEMENTATION` to transformers' registries (attention and
mask: the mask is SDPA's); models select it by ``attn_implementation=ATTN_IMPLEMENTATION``. Only the
process that registers it sees it, and a saved model keeps no trace of it: other readers (VERL, vLLM) load
the same checkpoints with their own attention.
"""

from __future__ import annotations

import functools

import torch

ATTN_IMPLEMENTATION = "sdpa_gqa"


def sdpa_gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` (b, heads, q, d), ``key`` / ``value``
    (b, kv_heads, k, d) -> (b, q, heads, d). The causal flag follows `sdpa_attention_forward`: only a
    multi-token query without a mask uses the kernel's own causal mask."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Register `ATTN_IMPLEMENTATION` with transformers (once per process); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_gqa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
