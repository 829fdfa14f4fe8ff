"""Model families ported natively to this project's transformers: one module per family.

What every ported family shares lives here: loading a checkpoint folder strictly (its
safetensors only, none of its code, and every weight under exactly the official name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_MISMATCHES = ("missing_keys", "unexpected_keys", "mismatched_keys")


def load_strict(model_class: Any, folder: str | Path, config: Any, *, dtype: Any, device_map: Any = None,
                attn_implementation: str = "sdpa", layout: str) -> Any:
    """`model_class.from_pretrained(folder)` from safetensors, in eval mode, refusing a folder
    whose weights are not exactly the official `layout`'s (a missing weight would otherwise be
    left at its random initial value without a word)."""
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "use_safetensors": True,
                              "attn_implementation": attn_implementation, "output_loading_info": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model, info = model_class.from_pretrained(str(folder), **kwargs)
    bad = {k: v for k, v in info.items() if k in _MISMATCHES and v}
    if bad:
        raise ValueError(f"{folder}: weights do not match the {layout} layout: {bad}")
    return model.eval()
