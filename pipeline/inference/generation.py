"""Generation settings: each family's own defaults, overridable per run, recorded with every row.

A family's default is what its original code does in its deterministic mode: MiniCPM-V
2.0's `chat(sampling=False)` is beam search with 3 beams and `repetition_penalty` 1.2 (its
published scores come from that setting); Mono-InternVL and MiniMax-VL-01 are greedy. A run
may override either value (RunConfig `num_beams`, `repetition_penalty`). The effective
setting is part of the rows' prompt version and of the `runs` table.

The repetition penalty counts only the answer's own tokens (and the family's start ids), as
MiniCPM-V 2.0's original does: it generates from embeddings, so the prompt (thousands of
image placeholders, the question, a PDF text layer given as an OCR hint) is never penalised.
transformers' own processor would penalise every prompt token, which differs from the
original and would push an OCR answer away from the words of its own hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """Deterministic decoding: greedy (num_beams 1) or beam search, with an optional penalty."""

    num_beams: int = 1
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if int(self.num_beams) < 1:
            raise ValueError(f"num_beams must be at least 1, not {self.num_beams}")
        if not float(self.repetition_penalty) > 0:
            raise ValueError(f"repetition_penalty must be positive, not {self.repetition_penalty}")

    def override(self, num_beams: int | None = None, repetition_penalty: float | None = None) -> GenerationSettings:
        """These settings with the run's overrides (None keeps the family's value)."""
        changes: dict[str, Any] = {}
        if num_beams is not None:
            changes["num_beams"] = int(num_beams)
        if repetition_penalty is not None:
            changes["repetition_penalty"] = float(repetition_penalty)
        return replace(self, **changes)

    @property
    def tag(self) -> str:
        """Short name recorded in the prompt version: `greedy`, `beams3-rp1.2`, ..."""
        name = "greedy" if self.num_beams == 1 else f"beams{self.num_beams}"
        return name if self.repetition_penalty == 1.0 else f"{name}-rp{self.repetition_penalty:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty, "do_sample": False}

    def config_kwargs(self) -> dict[str, Any]:
        """`GenerationConfig` keyword arguments (the penalty goes in as a logits processor)."""
        return {"do_sample": False, "num_beams": self.num_beams}

    def logits_processors(self, prompt_width: int, start_ids: Sequence[int] = ()) -> list[Any]:
        """The processors these settings add to a `generate` call whose prompts are `prompt_width` wide."""
        if self.repetition_penalty == 1.0:
            return []
        return [AnswerRepetitionPenalty(self.repetition_penalty, prompt_width, start_ids)]


class AnswerRepetitionPenalty:
    """CTRL's repetition penalty (as transformers applies it: a positive logit divided by the
    penalty, a negative one multiplied) over the tokens generated so far plus `start_ids`,
    never over the prompt."""

    def __init__(self, penalty: float, prompt_width: int, start_ids: Sequence[int] = ()) -> None:
        self.penalty = float(penalty)
        self.prompt_width = int(prompt_width)
        self.start_ids = tuple(int(i) for i in start_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        seen = input_ids[:, self.prompt_width :]
        if self.start_ids:
            start = torch.tensor(self.start_ids, dtype=seen.dtype, device=seen.device).expand(seen.shape[0], -1)
            seen = torch.cat([start, seen], dim=1)
        if seen.shape[1] == 0:
            return scores
        picked = torch.gather(scores, 1, seen)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, seen, picked)


GREEDY = GenerationSettings()

__all__ = ["GREEDY", "AnswerRepetitionPenalty", "GenerationSettings"]
