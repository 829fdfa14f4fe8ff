"""A model's KV cache cut and joined row by row, for the continuous-batching engine.

The engine keeps one transformers cache object for all the rows it is decoding. Rows leave
it (`select`), copies of a page's prefix join it (`expand`, `concat`), and the columns that
only padding is left in go (`trim_left`). Rows of different lengths sit left-padded: a row's
padding columns are masked out of softmax attention by the attention mask the engine passes.

What is cut: every initialised `DynamicLayer` (keys and values of shape (batch, kv heads,
length, head dim)) and, for MiniMax's hybrid cache, the lightning-attention state of each
linear layer (batch, heads, dim, dim), which has no length. Other layer kinds (sliding
windows, static or quantised caches) are refused: their tensors do not line up by column.

Tensors are never changed in place: a copy of a cache shares its tensors with the original
until either is updated (transformers' DynamicLayer.update concatenates into new tensors),
so a page's prefix cache can be expanded into many rows and stay valid for later rows.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch


class UnsupportedCacheError(NotImplementedError):
    """The model's cache holds layers the engine cannot cut row by row."""


def _kv_layers(cache: Any) -> list[Any]:
    """The cache's layers that hold keys and values (uninitialised ones are skipped)."""
    from transformers.cache_utils import DynamicLayer

    layers = []
    for layer in getattr(cache, "layers", ()):
        if not getattr(layer, "is_initialized", False) or getattr(layer, "keys", None) is None:
            continue
        if type(layer) is not DynamicLayer:
            raise UnsupportedCacheError(f"the engine cannot batch a {type(layer).__name__} cache layer")
        if layer.keys.numel() == 0:
            continue
        layers.append(layer)
    return layers


def _linear_states(cache: Any) -> list[Any] | None:
    states = getattr(cache, "linear_cache", None)
    return states if isinstance(states, list) else None


def check(cache: Any) -> None:
    """Raise if the cache cannot be cut row by row."""
    if not hasattr(cache, "layers"):
        raise UnsupportedCacheError(f"the engine cannot batch a {type(cache).__name__}")
    _kv_layers(cache)


def length(cache: Any) -> int:
    """Columns (cached positions, padding included) of the cache."""
    layers = _kv_layers(cache)
    return int(layers[0].keys.shape[-2]) if layers else 0


def batch_size(cache: Any) -> int:
    layers = _kv_layers(cache)
    if layers:
        return int(layers[0].keys.shape[0])
    states = [s for s in _linear_states(cache) or () if isinstance(s, torch.Tensor)]
    return int(states[0].shape[0]) if states else 0


def _map(cache: Any, kv: Any, state: Any) -> None:
    """Replace, in this cache object, each layer's keys/values by kv(t) and each linear state by state(t)."""
    for layer in _kv_layers(cache):
        layer.keys, layer.values = kv(layer.keys), kv(layer.values)
    states = _linear_states(cache)
    if states is not None:
        for i, s in enumerate(states):
            if isinstance(s, torch.Tensor):
                states[i] = state(s)


def copy_of(cache: Any) -> Any:
    """A new cache object sharing this one's tensors (its layers are new objects)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    states = _linear_states(cache)
    if states is not None:
        new.linear_cache = list(states)
    return new


def select(cache: Any, index: torch.Tensor) -> None:
    """Keep rows `index` (in that order; a row may repeat), in place."""
    _map(cache, lambda t: t.index_select(0, index.to(t.device)), lambda s: s.index_select(0, index.to(s.device)))


def expand(cache: Any, rows: int) -> Any:
    """A new cache of `rows` copies of a one-row cache (views until written)."""
    new = copy_of(cache)
    _map(new, lambda t: t.expand(rows, *t.shape[1:]), lambda s: s.expand(rows, *s.shape[1:]))
    return new


def pad_left(cache: Any, columns: int) -> None:
    """Add `columns` empty columns before every row, in place."""
    if columns <= 0:
        return

    def pad(t: torch.Tensor) -> torch.Tensor:
        zeros = t.new_zeros((*t.shape[:2], columns, t.shape[3]))
        return torch.cat((zeros, t), dim=2)

    _map(cache, pad, lambda s: s)


def trim_left(cache: Any, columns: int) -> None:
    """Drop the first `columns` columns of every row (padding for all of them), in place."""
    if columns > 0:
        _map(cache, lambda t: t[:, :, columns:], lambda s: s)


def concat(caches: Sequence[Any]) -> Any:
    """One cache of all rows of `caches` (in order), each left-padded to the longest; the
    first cache object is reused for the result."""
    if len(caches) == 1:
        return caches[0]
    lengths = [length(c) for c in caches]
    width = max(lengths)
    parts = [_kv_layers(c) for c in caches]
    states = [_linear_states(c) for c in caches]
    head = caches[0]
    for i, layer in enumerate(parts[0]):
        keys, values = [], []
        for layers, own in zip(parts, lengths, strict=True):
            pad = width - own
            k, v = layers[i].keys, layers[i].values
            if pad:
                k = torch.cat((k.new_zeros((*k.shape[:2], pad, k.shape[3])), k), dim=2)
                v = torch.cat((v.new_zeros((*v.shape[:2], pad, v.shape[3])), v), dim=2)
            keys.append(k)
            values.append(v)
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    if states[0] is not None:
        for i, s in enumerate(states[0]):
            if isinstance(s, torch.Tensor):
                states[0][i] = torch.cat([st[i] for st in states])  # type: ignore[index]
    return head


__all__ = ["UnsupportedCacheError", "batch_size", "check", "concat", "copy_of", "expand", "length", "pad_left",
           "select", "trim_left"]
