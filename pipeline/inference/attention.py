"""Decode-step attention that does not copy the KV cache: grouped-query attention with the
query heads folded onto their key/value head, whatever the transformers version.

A batch of rows of different lengths needs a padding mask, and transformers' SDPA path
before 5.20 (`integrations/sdpa_attention.py`) then repeats every key/value head to the
number of query heads (`repeat_kv`) at every call: at a decode step that copies the whole
KV cache of every layer to read it once. On a medium model that made the batched engine
2.35x slower under transformers 5.19 than under 5.25 (a 13x slower attention call for
16 rows of 3,000 tokens), while one unpadded row (`enable_gqa`, no mask) was unaffected.
transformers 5.20+ folds a single query token's heads itself (`pack_gqa`); this does the
same for every version: a query of one token, (batch, heads, 1, dim), is viewed as
(batch, kv_heads, heads/kv_heads, dim), attends to the cache's own key/value heads, and
is viewed back. Anything else (a prefill, no grouped heads, a position bias) goes to
transformers' own SDPA function unchanged.

`use_packed_decode_attention(model)` registers it under its own name and switches the
grouped-query attention modules of a model loaded with "sdpa" to it (their configs only:
vision towers keep what they had).
"""

from __future__ import annotations

from typing import Any

NAME = "docpipe_sdpa"


def packed_decode_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                            dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                            **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature; output (batch, q_len, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q_len, dim = query.shape
    plain_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (q_len != 1 or groups == 1 or not plain_mask or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    folded = query.reshape(batch, heads // groups, groups, dim)  # head h = kv head h // groups, as repeat_kv
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, packed_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets, under the new name


def use_packed_decode_attention(model: Any) -> int:
    """Switch `model`'s grouped-query attention modules from "sdpa" to the packed decode path;
    returns how many configs were switched (0: nothing to do, e.g. flash attention or no GQA)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if int(getattr(module, "num_key_value_groups", 1) or 1) > 1 and config is not None:
            if getattr(config, "_attn_implementation", None) == "sdpa":
                configs[id(config)] = config
    if configs:
        _register()
        for config in configs.values():
            config._attn_implementation_internal = NAME  # not the setter: it would recurse into sub-configs
    return len(configs)


__all__ = ["NAME", "packed_decode_attention", "use_packed_decode_attention"]
