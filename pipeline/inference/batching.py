"""Pure batching helpers: pack work by a visual-token budget, split on failure, and
detect runaway generations. No torch here; everything is a function of plain values."""

from __future__ import annotations

from collections.abc import Sequence


def pack_by_budget(costs: Sequence[int], budget: int, max_items: int) -> list[list[int]]:
    """Group item indices, in order, into batches of total cost <= `budget` and at most
    `max_items` items. An item costing more than the budget gets a batch of its own (it
    is still processed; the OOM back-off deals with it if it does not fit)."""
    if budget < 1 or max_items < 1:
        raise ValueError("budget and max_items must be at least 1")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, cost in enumerate(costs):
        if cost < 0:
            raise ValueError(f"cost of item {index} is negative: {cost}")
        if current and (used + cost > budget or len(current) >= max_items):
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    if current:
        batches.append(current)
    return batches


def halves(items: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split a batch in two for the out-of-memory back-off (first half the larger)."""
    if len(items) < 2:
        raise ValueError("cannot split a batch of fewer than two items")
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])


def repeating_tail(tokens: Sequence[int], *, max_ngram: int = 32, min_repeats: int = 3, min_span: int = 16) -> int | None:
    """Length of the shortest n-gram that the end of `tokens` repeats, or None.

    The tail counts as repeating when its last n tokens occur at least
    max(min_repeats, ceil(min_span / n)) times back to back, for some n <= max_ngram.
    """
    length = len(tokens)
    for n in range(1, max_ngram + 1):
        repeats = max(min_repeats, -(-min_span // n))
        span = n * repeats
        if span > length:
            continue
        gram = list(tokens[length - n :])
        tail = tokens[length - span :]
        if all(list(tail[i * n : (i + 1) * n]) == gram for i in range(repeats)):
            return n
    return None


def is_repetitive(tokens: Sequence[int], hit_limit: bool, **kwargs: int) -> bool:
    """A generation is flagged repetitive when it hit the token limit with a repeating tail."""
    return hit_limit and repeating_tail(tokens, **kwargs) is not None


__all__ = ["halves", "is_repetitive", "pack_by_budget", "repeating_tail"]
