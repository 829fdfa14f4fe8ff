"""Pure batching helpers: the one rule that batches pages (`BatchRule`), packing by it,
splitting on failure, and detecting runaway generations. No torch here; everything is a
function of plain values.

Pages are batched in exactly one place by one rule, whatever the engine: the shard feeds
prepared pages, as they come, through the engine's `BatchRule` (`fits` / `full`) and hands
each closed batch to `engine.answer`; `pack_by_budget` is the same rule applied to a list
at once (for callers that hand an engine many pages, e.g. benchmarks), so a batch the
shard closed is never split again (only the out-of-memory back-off halves one). The transformers engine's rule is its visual-token
budget and page bound; the vLLM engine's is a bound on pages in flight (its own scheduler
does the rest).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchRule:
    """Batches of at most `max_pages` pages and `budget` visual tokens; a page costing more
    than the budget gets a batch of its own (it is still processed; the out-of-memory
    back-off deals with it if it does not fit)."""

    budget: int
    max_pages: int

    def __post_init__(self) -> None:
        if self.budget < 1 or self.max_pages < 1:
            raise ValueError("budget and max_items must be at least 1")

    @classmethod
    def pages_only(cls, max_pages: int) -> "BatchRule":
        """A bound on pages alone (no token budget)."""
        return cls(budget=sys.maxsize, max_pages=max_pages)

    def fits(self, count: int, used: int, cost: int) -> bool:
        """Whether an item of `cost` joins a batch of `count` items costing `used`."""
        if cost < 0:
            raise ValueError(f"cost is negative: {cost}")
        return count == 0 or (used + cost <= self.budget and count < self.max_pages)

    def full(self, count: int, used: int) -> bool:
        """Whether no further item (of any cost >= 0) can join the batch: close it now."""
        return count >= self.max_pages or used > self.budget


def pack(costs: Sequence[int], rule: BatchRule) -> list[list[int]]:
    """Batch item indices, in order, by `rule` (the same batches as feeding them one at a time)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, cost in enumerate(costs):
        if cost < 0:
            raise ValueError(f"cost of item {index} is negative: {cost}")
        if not rule.fits(len(current), used, cost):
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    if current:
        batches.append(current)
    return batches


def pack_by_budget(costs: Sequence[int], budget: int, max_items: int) -> list[list[int]]:
    """Group item indices, in order, into batches of total cost <= `budget` and at most
    `max_items` items (`pack` with `BatchRule(budget, max_items)`)."""
    return pack(costs, BatchRule(budget, max_items))


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


__all__ = ["BatchRule", "halves", "is_repetitive", "pack", "pack_by_budget", "repeating_tail"]
