"""Forced output lengths for benchmarks and tests: a random tiny model made to answer like
real pages (a 700-token OCR row beside a 1-token chart check), never used for real answers.

`forced_output(page, key)` gives a row's target: a length (generated tokens, the end token
included: end barred before it, forced at it) or exact token ids (the end token follows).
`force(engine, forced_output)` puts it on any engine: the continuous transformers engine
through its score hook (`ForcedScores`), the static reference engine (bench.support.static_engine)
through its `forced_output` attribute, and the vLLM engine as a `ForcedVllmEngine` over the
same `vllm.LLM` (its requests' sampling parameters and rows). With beams every beam of a row
is forced alike, so the best hypothesis is the forced one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pipeline.inference.adapters import PreparedPage
from pipeline.inference.page_engine import Gen, row_kind
from pipeline.inference.vllm_engine import VllmEngine

# A forced output: a length (generated tokens, end token included) or the exact token ids
# to produce (the end token is added after them).
ForcedOutput = Callable[[PreparedPage, str], "int | Sequence[int]"]


def _forced_token(target: int | Sequence[int], step: int, eos: int) -> int | None:
    """The token row must produce at `step` (tokens generated before it), None: only end barred."""
    if isinstance(target, int):
        return None if step + 1 < target else eos
    return int(target[step]) if step < len(target) else eos


def _force_row(scores: Any, row: int, target: int | Sequence[int], step: int, eos_ids: Sequence[int]) -> None:
    token = _forced_token(target, step, eos_ids[0])
    if token is None:
        scores[row, list(eos_ids)] = float("-inf")
    else:
        scores[row, :] = float("-inf")
        scores[row, token] = 0.0


class ForcedScores:
    """Score hook of the continuous engine (pipeline.inference.decoding.ScoreHook): rows tagged
    (page, key), with their own step counts."""

    def __init__(self, forced_output: ForcedOutput, eos_ids: Sequence[int]) -> None:
        self.forced_output = forced_output
        self.eos_ids = sorted(eos_ids)

    def __call__(self, tags: Sequence[Any], steps: Any, scores: Any) -> Any:
        for row, ((page, key), step) in enumerate(zip(tags, steps.tolist(), strict=True)):
            _force_row(scores, row, self.forced_output(page, key), int(step), self.eos_ids)
        return scores


class ForcedLogits:
    """The same as a transformers logits processor over one `generate()` call whose prompts are
    `width` wide: row r of the call (beams: row r // beams) produces `targets[r]`."""

    def __init__(self, width: int, targets: Sequence[int | Sequence[int]], eos_ids: Sequence[int]) -> None:
        self.width = width
        self.targets = list(targets)
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self.width  # tokens generated so far
        beams = max(1, scores.shape[0] // len(self.targets))
        for row in range(scores.shape[0]):
            _force_row(scores, row, self.targets[row // beams], step, self.eos_ids)
        return scores


class ForcedVllmEngine(VllmEngine):
    """The vLLM engine with `forced_output`'s lengths: each request may not end before its
    forced length and stops there (the same decode steps as the forced transformers row);
    every decoded token counts, and forced exact ids stand for the row's output (so a chart
    check forced to "yes" says yes, whatever the random model decoded)."""

    forced_output: ForcedOutput | None = None

    @classmethod
    def like(cls, engine: VllmEngine, forced_output: ForcedOutput | None) -> "ForcedVllmEngine":
        """A forced engine over `engine`'s `vllm.LLM` and builder, with its limits."""
        forced = cls(engine.llm, engine.builder, model_id=engine.model_id, revision=engine.revision,
                     dtype=engine.dtype, max_new_tokens=dict(engine.budgets), max_pages=engine.batch_rule.max_pages,
                     ocr=engine.ocr, prompt_version=engine.prompt_version)
        forced.forced_output = forced_output
        return forced

    def _target(self, page: PreparedPage, key: str) -> tuple[int, list[int] | None]:
        """(the request's length, the exact ids that stand for its output or None)."""
        assert self.forced_output is not None
        limit = self.budgets[row_kind(key)]
        target = self.forced_output(page, key)
        ids = None if isinstance(target, int) else [int(t) for t in target]
        return min(limit, target if ids is None else len(ids) + 1), ids  # the end token included

    def _params(self, page: PreparedPage, key: str) -> Any:
        if self.forced_output is None:
            return super()._params(page, key)
        from vllm import SamplingParams

        length, _ = self._target(page, key)
        # the same decode steps as the forced transformers row: no end token before `length`
        return SamplingParams(max_tokens=length, min_tokens=length, ignore_eos=True, **self._sampling())

    def _row(self, page: PreparedPage, key: str, tokens: list[int]) -> Gen:
        if self.forced_output is None:
            return super()._row(page, key, tokens)
        _, ids = self._target(page, key)
        stand = ids if ids is not None else tokens  # exact ids forced: they stand for the output
        text = self.builder.tokenizer.decode(stand, skip_special_tokens=True).strip()
        self.stats.generated_tokens += len(tokens)  # every decoded token counts (no end token was allowed)
        return Gen(tokens=list(stand), text=text, prompt_tokens=0, generated_tokens=len(tokens),
                   hit_limit=ids is None and len(tokens) >= self.budgets[row_kind(key)])


def force(engine: Any, forced_output: ForcedOutput | None) -> Any:
    """Make `engine` produce `forced_output`'s lengths (None: stop forcing); returns the engine to
    use: `engine` itself, or for the vLLM engine a `ForcedVllmEngine` over the same `vllm.LLM`."""
    if isinstance(engine, ForcedVllmEngine) or hasattr(engine, "forced_output"):
        engine.forced_output = forced_output
    elif isinstance(engine, VllmEngine):
        return ForcedVllmEngine.like(engine, forced_output)
    else:
        engine.score_hook = None if forced_output is None else ForcedScores(forced_output, engine.eos_token_ids)
    return engine


__all__ = ["ForcedLogits", "ForcedOutput", "ForcedScores", "ForcedVllmEngine", "force"]
