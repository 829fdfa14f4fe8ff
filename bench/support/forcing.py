"""Forced output lengths for benchmarks and tests: a random tiny model made to answer like
real pages (a 700-token OCR row beside a 1-token chart check), never used for real answers.

`forced_output(page, key)` gives a row's target: a length (generated tokens, the end token
included: end barred before it, forced at it) or exact token ids (the end token follows).
`force(engine, forced_output)` puts it on any engine: the continuous transformers engine
through its score hook (`ForcedScores`), the static reference engine and the vLLM engine
through their `forced_output` attribute. With beams every beam of a row is forced alike, so
the best hypothesis is the forced one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.inference.page_engine import ForcedOutput


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


def force(engine: Any, forced_output: ForcedOutput | None) -> Any:
    """Make `engine` produce `forced_output`'s lengths (None: stop forcing); returns the engine."""
    if hasattr(engine, "score_hook") and not hasattr(engine, "forced_output"):
        engine.score_hook = None if forced_output is None else ForcedScores(forced_output, engine.eos_token_ids)
    else:
        engine.forced_output = forced_output
    return engine


__all__ = ["ForcedLogits", "ForcedScores", "force"]
