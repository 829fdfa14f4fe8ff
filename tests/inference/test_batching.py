"""Pure batching helpers: packing by visual-token budget, back-off halves, repetition."""

from __future__ import annotations

import random

import pytest

from pipeline.inference.batching import BatchRule, halves, is_repetitive, pack, pack_by_budget, repeating_tail
from pipeline.inference.page_engine import EngineStats


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


# ---- the one grouping rule: the runner feeds pages through it, the engine packs by it ----


def _feed(costs: list[int], rule: BatchRule) -> list[list[int]]:
    """Group item indices as the runner does, one page at a time (pipeline.shard.run._ShardRun.on_page)."""
    groups: list[list[int]] = []
    held: list[int] = []
    used = 0
    for index, cost in enumerate(costs):
        if not rule.fits(len(held), used, cost):
            groups.append(held)
            held, used = [], 0
        held.append(index)
        used += cost
        if rule.full(len(held), used):
            groups.append(held)
            held, used = [], 0
    if held:
        groups.append(held)
    return groups


@pytest.mark.parametrize("seed", range(30))
def test_feeding_pages_one_at_a_time_gives_the_groups_of_pack(seed: int) -> None:
    rng = random.Random(seed)
    costs = [rng.choice([0, rng.randint(1, 60)]) for _ in range(rng.randint(1, 50))]
    rule = BatchRule(rng.randint(1, 150), rng.randint(1, 8))
    groups = _feed(costs, rule)
    assert groups == pack(costs, rule)
    for group in groups:  # the engine packs a group the runner closed into that one group
        assert pack([costs[i] for i in group], rule) == [list(range(len(group)))]


def test_default_limits_with_13_tile_pages_give_full_groups_not_4_1() -> None:
    # 13-tile InternVL pages (3,328 visual tokens) at the defaults (16,384 tokens, 16 pages):
    # the runner used to close its window at >= the budget (5 pages) and the engine split it
    # again by > the budget, giving batches of [4, 1, 4, 1, ...]. One rule: [4, 4, 4, ...].
    rule = BatchRule(16_384, 16)
    groups = _feed([3328] * 20, rule)
    assert [len(g) for g in groups] == [4] * 5
    assert [len(g) for g in pack([3328] * 20, rule)] == [4] * 5


def test_pages_only_rule_bounds_pages_not_tokens() -> None:
    rule = BatchRule.pages_only(3)
    assert pack([10**9, 10**9, 10**9, 1], rule) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError):
        BatchRule.pages_only(0)
    with pytest.raises(ValueError):
        rule.fits(0, 0, -1)


class _GroupRecorder:
    """An engine that records the groups the runner hands it and answers every page."""

    model_id, revision, dtype, prompt_version = "recorder", None, "float32", "p"
    stats = EngineStats()

    class builder:  # noqa: N801 - stands in for an InputBuilder
        family = "internvl"
        stretches_to_canvas = True  # the internvl policy's geometry, as a run without a model has

        @staticmethod
        def target_size(width_pt: float, height_pt: float):
            from pipeline import tiling

            return tiling.TilingOptions().target_size(width_pt, height_pt)

        @staticmethod
        def plan(width: int, height: int):
            from pipeline import tiling

            return tiling.plan_internvl(width, height)

        @staticmethod
        def build(page, plan):
            return object()

    def __init__(self, rule: BatchRule) -> None:
        self.batch_rule = rule
        self.groups: list[list[int]] = []

    def answer(self, pages):
        from pipeline.records import PageAnswers

        self.groups.append(len(pages))
        return [PageAnswers(self.model_id, None, self.dtype, self.prompt_version, description="d") for _ in pages]


@pytest.mark.parametrize("budget,max_pages", [(10**9, 4), (3 * 3328, 16)])
def test_the_runner_hands_the_engine_groups_made_by_the_engine_rule(tmp_path, monkeypatch, budget, max_pages) -> None:
    from pipeline import runner
    from pipeline.config import RunConfig
    from tests.prefect_support import make_corpus

    src, out = tmp_path / "in", tmp_path / "out"
    pages = sum(make_corpus(src, 6).values())  # 1-3 page PDFs, 12 pages
    engine = _GroupRecorder(BatchRule(budget, max_pages))
    monkeypatch.setattr(runner, "get_engine", lambda config: engine)
    # the run's own limits differ: the engine's rule is the one that groups
    cfg = RunConfig(source=str(src), output=str(out), progress=False, prep_workers=0, shard_size=100,
                    model=str(tmp_path / "unused-model"), max_batch_pages=1, batch_visual_tokens=1)
    runner.run(cfg)
    assert sum(engine.groups) == pages
    costs = [3328] * pages  # Letter pages: 13 InternVL tiles each
    expected = [len(g) for g in pack(costs, engine.batch_rule)]
    assert engine.groups == expected and len(set(expected[:-1])) == 1
