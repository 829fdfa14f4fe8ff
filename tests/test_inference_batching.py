"""Pure batching helpers: packing by visual-token budget, back-off halves, repetition."""

from __future__ import annotations

import random

import pytest

from pipeline.inference.batching import halves, is_repetitive, pack_by_budget, repeating_tail


def test_pack_by_budget_examples() -> None:
    assert pack_by_budget([], 10, 4) == []
    assert pack_by_budget([4, 4, 4], 8, 10) == [[0, 1], [2]]
    assert pack_by_budget([3, 3, 3, 3, 3], 100, 2) == [[0, 1], [2, 3], [4]]
    assert pack_by_budget([20, 1, 1], 10, 4) == [[0], [1, 2]]  # oversized item alone
    assert pack_by_budget([1, 20, 1], 10, 4) == [[0], [1], [2]]
    assert pack_by_budget([3328] * 5, 16_384, 16) == [[0, 1, 2, 3], [4]]  # 13-tile InternVL pages


@pytest.mark.parametrize("seed", range(20))
def test_pack_by_budget_properties(seed: int) -> None:
    rng = random.Random(seed)
    costs = [rng.randint(0, 50) for _ in range(rng.randint(1, 40))]
    budget, max_items = rng.randint(1, 120), rng.randint(1, 6)
    batches = pack_by_budget(costs, budget, max_items)
    assert [i for b in batches for i in b] == list(range(len(costs)))  # all, once, in order
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        assert sum(costs[i] for i in batch) <= budget or len(batch) == 1
    for first, second in zip(batches, batches[1:]):  # greedy: the next item did not fit
        full = len(first) == max_items
        assert full or sum(costs[i] for i in first) + costs[second[0]] > budget


def test_pack_by_budget_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pack_by_budget([1], 0, 1)
    with pytest.raises(ValueError):
        pack_by_budget([1], 1, 0)
    with pytest.raises(ValueError, match="negative"):
        pack_by_budget([-1], 5, 1)


def test_halves() -> None:
    assert halves([1, 2, 3]) == ([1, 2], [3])
    assert halves([1, 2]) == ([1], [2])
    with pytest.raises(ValueError):
        halves([1])


def test_repeating_tail() -> None:
    assert repeating_tail([1] * 16) == 1
    assert repeating_tail([1] * 15) is None  # too short a span to call it a loop
    assert repeating_tail([9, 9] + [3, 4, 5] * 6) == 3
    assert repeating_tail(list(range(40))) is None
    assert repeating_tail([1, 2, 3, 4] * 4) == 4
    assert repeating_tail([1, 2] * 8) == 2
    assert repeating_tail([1, 2] * 8, min_span=40) is None
    tail = list(range(30))
    assert repeating_tail([0] + tail * 3) == 30
    assert repeating_tail([0] + tail * 3, max_ngram=20) is None


def test_is_repetitive_needs_the_limit() -> None:
    loop = [7, 8] * 10
    assert is_repetitive(loop, hit_limit=True)
    assert not is_repetitive(loop, hit_limit=False)  # it stopped on its own
    assert not is_repetitive(list(range(20)), hit_limit=True)  # merely long
