"""A page as a vLLM image item: the tensors docpipe sends for a seed family (no vllm import).

The families' `vllm.py` build their requests with `page_tensors` in processes without
vllm too (tests, the engine's preparation); the processor that reads these items is in
`families/vllm_support.py` (which imports vllm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CODES, TABLE, RUN = "pixel_codes", "pixel_table", "placeholder_ids"  # every page item has these


def page_tensors(codes: np.ndarray, table: np.ndarray, run: Sequence[int], **extra: Any) -> dict[str, torch.Tensor]:
    """A page as its vLLM image item: coded pixels, their table, the placeholder run, extras."""
    item = {CODES: torch.from_numpy(np.ascontiguousarray(codes)), TABLE: torch.from_numpy(np.asarray(table, np.float32)),
            RUN: torch.as_tensor(list(run), dtype=torch.int64)}
    item.update({k: torch.as_tensor(np.asarray(v)) for k, v in extra.items()})
    return item


__all__ = ["CODES", "RUN", "TABLE", "page_tensors"]
