"""A model's KV cache cut and joined row by row, for the continuous-batching engine.

The engine keeps one transformers cache object for all the rows it is decoding. Rows leave
it (`select`), copies of a page's prefix join it (`expand`, `concat`), and the columns that
only padding is left in go (`trim_left`). Rows of different lengths sit left-padded: a row's
padding columns are masked out of softmax attention by the attention mask the engine passes.

What is cut: every initialised `DynamicLayer` (keys and values of shape (batch, kv heads,
length, head dim)) and, for MiniMax's hybrid cache, the lightning-attention state of each
linear layer (batch, heads, dim, dim), which has no length. Other layer kinds (sliding
windows, static or quantised caches) are refused: their tensors do not line up by column.

The decoding rows' layers are `GrowingLayer`s: keys and values in buffers with room to the
right, so a decode step writes its token in place, where transformers' DynamicLayer copies
the whole cache into a new tensor at every step. A page's prefix cache stays a plain
DynamicLayer that is never written: its copies (`expand`) are views until their first update,
which concatenates into new tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

ROOM = 256  # positions a decoding row's buffers keep free to the right


class UnsupportedCacheError(NotImplementedError):
    """The model's cache holds layers the engine cannot cut row by row."""


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of larger buffers: `update` writes the new
    positions in place (the buffers grow, by copying, only when full)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int = ROOM) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = keys.device
        self._k = self._buffer(keys, room)
        self._v = self._buffer(values, room)
        self._length = int(keys.shape[2])
        self._views()

    @staticmethod
    def _buffer(t: torch.Tensor, room: int) -> torch.Tensor:
        out = t.new_empty((t.shape[0], t.shape[1], t.shape[2] + room, t.shape[3]))
        out[:, :, : t.shape[2]] = t
        return out

    def _views(self) -> None:
        self.keys = self._k[:, :, : self._length]
        self.values = self._v[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = int(key_states.shape[2])
        if self._length + new > self._k.shape[2]:
            room = max(new, ROOM, self._length // 2)
            self._k, self._v = self._buffer(self.keys, room), self._buffer(self.values, room)
        self._k[:, :, self._length : self._length + new] = key_states
        self._v[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def select(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
        self._views()

    def trim_left(self, columns: int) -> None:
        self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
        self._length -= columns
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select(beam_idx.to(self._k.device))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the engine's decoding layers are not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the engine's decoding layers are not repeated")


def _kv_layers(cache: Any) -> list[tuple[int, Any]]:
    """(index, layer) of the cache's layers that hold keys and values (uninitialised ones skipped)."""
    layers = []
    for i, layer in enumerate(getattr(cache, "layers", ())):
        if not getattr(layer, "is_initialized", False) or getattr(layer, "keys", None) is None:
            continue
        if type(layer) not in (DynamicLayer, GrowingLayer):
            raise UnsupportedCacheError(f"the engine cannot batch a {type(layer).__name__} cache layer")
        if layer.keys.numel() == 0:
            continue
        layers.append((i, layer))
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
    return int(layers[0][1].keys.shape[-2]) if layers else 0


def _map_states(cache: Any, fn: Any) -> None:
    states = _linear_states(cache)
    if states is not None:
        for i, s in enumerate(states):
            if isinstance(s, torch.Tensor):
                states[i] = fn(s)


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
    for _, layer in _kv_layers(cache):
        index = index.to(layer.keys.device)
        if isinstance(layer, GrowingLayer):
            layer.select(index)
        else:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    _map_states(cache, lambda s: s.index_select(0, index.to(s.device)))


def copy_rows(cache: Any, rows: torch.Tensor, sources: torch.Tensor, columns: int) -> None:
    """Row rows[i] takes row sources[i]'s last `columns` columns (and its linear states), in place:
    beam search's reorder, where the beams of a request share every column before their own
    generated tokens, so only those need copying (transformers copies the whole cache)."""
    for _, layer in _kv_layers(cache):
        index, source = rows.to(layer.keys.device), sources.to(layer.keys.device)
        if isinstance(layer, GrowingLayer):
            start = max(0, layer._length - columns)
            layer._k[index, :, start : layer._length] = layer._k[source, :, start : layer._length]
            layer._v[index, :, start : layer._length] = layer._v[source, :, start : layer._length]
        else:
            layer.keys = layer.keys.index_copy(0, index, layer.keys.index_select(0, source))
            layer.values = layer.values.index_copy(0, index, layer.values.index_select(0, source))
    _map_states(cache, lambda s: s.index_copy(0, rows.to(s.device), s.index_select(0, sources.to(s.device))))


def expand(cache: Any, rows: int) -> Any:
    """A new cache of `rows` copies of a one-row cache of plain layers (views until written)."""
    new = copy_of(cache)
    for _, layer in _kv_layers(new):
        layer.keys, layer.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
    _map_states(new, lambda s: s.expand(rows, *s.shape[1:]))
    return new


def trim_left(cache: Any, columns: int) -> None:
    """Drop the first `columns` columns of every row (padding for all of them), in place."""
    if columns <= 0:
        return
    for _, layer in _kv_layers(cache):
        if isinstance(layer, GrowingLayer):
            layer.trim_left(columns)
        else:
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


def growing(cache: Any) -> None:
    """Turn the cache's plain layers into GrowingLayers (the rows are about to decode), in place."""
    for i, layer in _kv_layers(cache):
        if not isinstance(layer, GrowingLayer):
            cache.layers[i] = GrowingLayer(layer.keys, layer.values)


def concat(caches: Sequence[Any]) -> Any:
    """One cache of all rows of `caches` (in order), each left-padded to the longest, in
    GrowingLayers; the first cache object is reused for the result."""
    head = caches[0]
    if len(caches) == 1:
        growing(head)
        return head
    lengths = [length(c) for c in caches]
    width = max(lengths)
    parts = [_kv_layers(c) for c in caches]
    for n, (i, _) in enumerate(parts[0]):
        rows = []
        for layers, own in zip(parts, lengths, strict=True):
            k, v = layers[n][1].keys, layers[n][1].values
            rows.append((k, v, width - own))
        total = sum(int(k.shape[0]) for k, _, _ in rows)
        k0 = rows[0][0]
        keys = k0.new_zeros((total, k0.shape[1], width + ROOM, k0.shape[3]))
        values = keys.clone()
        start = 0
        for k, v, pad in rows:
            keys[start : start + k.shape[0], :, pad:width] = k
            values[start : start + k.shape[0], :, pad:width] = v
            start += int(k.shape[0])
        layer = GrowingLayer.__new__(GrowingLayer)
        DynamicLayer.__init__(layer)
        layer.is_initialized, layer.device = True, keys.device
        layer._k, layer._v, layer._length = keys, values, width
        layer._views()
        head.layers[i] = layer
    states = [_linear_states(c) for c in caches]
    if states[0] is not None:
        for i, s in enumerate(states[0]):
            if isinstance(s, torch.Tensor):
                states[0][i] = torch.cat([st[i] for st in states])  # type: ignore[index]
    return head


__all__ = ["GrowingLayer", "UnsupportedCacheError", "check", "concat", "copy_of", "copy_rows", "expand", "growing",
           "length", "select", "trim_left"]
