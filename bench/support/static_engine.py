"""The transformers engine as it was before continuous batching, kept as the reference for
tests (the continuous engine must give the same answers) and for the benchmark's side-by-side
(bench/inference.py): static `generate()` calls, and the model cards' naive loop.

* `StaticEngine.answer`: per batch of pages, one vision pass per page; then one `generate()`
  call per kind of row (chart checks, descriptions, OCR longest expected first, chart
  answers), packed by the visual-token budget, every row prefilled in full (image included)
  with left padding and decoded until the call's longest row stops. `schedule = "mixed"`:
  every kind in the same calls with the largest limit (the schedule before schema 1.4).
* `StaticEngine.answer_naive`: one page and one task at a time, raw pixel values into
  `generate()` (the image encoded again for every task), as the model cards' quick-starts do.

Same decoding as the engine (the family's greedy or beams, the answer-only repetition
penalty, end-of-turn tokens). Never used for real runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.support.forcing import ForcedLogits, ForcedOutput
from pipeline.inference import prompts
from pipeline.inference.adapters import CHART, PageFeatures, PreparedPage, input_device
from pipeline.inference.batching import pack_by_budget
from pipeline.inference.engine import Engine
from pipeline.inference.page_engine import ROW_KINDS, BatchResult, Gen, row_kind
from pipeline.records import PageAnswers


class StaticEngine(Engine):
    """Static batches through transformers' `generate()` (see the module docstring)."""

    name = "transformers-static"

    def __init__(self, *args: Any, forced_output: ForcedOutput | None = None, schedule: str = "by_kind",
                 **kwargs: Any) -> None:
        kwargs.setdefault("packed_attention", False)  # the attention transformers itself picks, as before
        super().__init__(*args, **kwargs)
        self.forced_output = forced_output  # benchmarks emulate realistic lengths with this
        self.schedule = schedule  # by_kind | mixed

    @classmethod
    def like(cls, engine: Engine, **kwargs: Any) -> StaticEngine:
        """A static engine over `engine`'s model and builder, with its limits and decoding."""
        settings: dict[str, Any] = {
            "model_id": engine.model_id, "revision": engine.revision, "dtype": engine.dtype,
            "max_new_tokens": dict(engine.budgets), "batch_visual_tokens": engine.batch_visual_tokens,
            "max_batch_pages": engine.max_batch_pages, "min_new_tokens": engine.min_new_tokens,
            "ocr": engine.ocr, "generation": engine.generation,
        }
        return cls(engine.model, engine.builder, **{**settings, **kwargs})

    # ---- the naive loop ----------------------------------------------------------------------
    def answer_naive(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """One page and one task at a time, raw pixel values into `generate` (the image encoded
        again for every task), as the model cards' quick-starts do. Raises on errors."""
        import torch

        answers = []
        for page in pages:
            # Pixels prepared once per page, as the quick-starts' load_image does (coded
            # pixels are decoded here, not once per task, so the baseline is not slowed).
            page = dataclasses.replace(page, pixels=page.pixel_values)
            t0 = time.perf_counter()
            result = BatchResult()
            with torch.inference_mode():
                for key in self._first_keys(page):
                    result.outputs[(0, key)] = self._generate_naive(page, key)
                chart = result.outputs.get((0, CHART))
                if chart is not None and prompts.parse_yes_no(chart.text):
                    for key in self._chart_keys(page):
                        result.outputs[(0, key)] = self._generate_naive(page, key)
            seconds = time.perf_counter() - t0
            self.stats.model_s += seconds
            answers.extend(self._assemble([page], result, seconds))
        return answers

    def _generate_naive(self, page: PreparedPage, key: str) -> Gen:
        inputs = self.builder.naive_inputs(page, key, input_device(self.model))
        width = inputs["input_ids"].shape[1]
        kind = row_kind(key)
        extra = self._forcing(width, [(page, key)], kind)
        sequences = self.model.generate(**inputs, generation_config=self.generation_config(kind), **extra)
        self.stats.generate_calls += 1
        self.stats.rows += 1
        gen = self._finish(sequences[0, width:].tolist(), self.budgets[kind])
        gen.prompt_tokens = width
        self._count_slots([width], width, sequences.shape[1] - width, [gen])
        return gen

    # ---- static batches ------------------------------------------------------------------------
    def _answer_batch(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        import torch

        t0 = time.perf_counter()
        result = BatchResult()
        with torch.inference_mode():
            t_enc = time.perf_counter()
            features = self.builder.encode(self.model, pages)
            self.stats.encode_s += time.perf_counter() - t_enc
            self.stats.encode_calls += 1
            first = [(i, key) for i, page in enumerate(pages) for key in self._first_keys(page)]
            self._generate_rows(first, pages, features, result)
            second = [
                (i, key)
                for i, page in enumerate(pages)
                if (i, CHART) in result.outputs and prompts.parse_yes_no(result.outputs[(i, CHART)].text)
                for key in self._chart_keys(page)
            ]
            self._generate_rows(second, pages, features, result)
        seconds = time.perf_counter() - t0
        self.stats.model_s += seconds
        return self._assemble(pages, result, seconds)

    def _generate_rows(self, rows: list[tuple[int, str]], pages: Sequence[PreparedPage],
                       features: Sequence[PageFeatures], result: BatchResult) -> None:
        if self.schedule == "mixed":  # every kind in one call
            costs = [pages[i].visual_tokens for i, _ in rows]
            packs = pack_by_budget(costs, self.batch_visual_tokens, self.max_batch_pages)
            calls = [("mixed", [rows[j] for j in packed]) for packed in packs]
        else:
            calls = schedule_rows(rows, pages, self.batch_visual_tokens, self.max_batch_pages)
        for kind, group in calls:
            prompt_ids = [pages[i].prompts[key] for i, key in group]
            forced = [(pages[i], key) for i, key in group]
            generated = self.generate(prompt_ids, [features[i] for i, _ in group], kind=kind, forced=forced)
            for (i, key), ids, gen in zip(group, prompt_ids, generated, strict=True):
                gen.prompt_tokens = len(ids)
                result.outputs[(i, key)] = gen

    def generate(self, prompt_ids: Sequence[np.ndarray], features: Sequence[PageFeatures], *, kind: str = "ocr",
                 limit: int | None = None, forced: Sequence[tuple[PreparedPage, str]] | None = None) -> list[Gen]:
        """One batched `generate()` over prompts whose images are already encoded, with the limit of
        `kind` rows ("mixed": the largest limit)."""
        inputs = self.builder.rows_to_inputs(self.model, list(zip(prompt_ids, features, strict=True)))
        width = inputs["input_ids"].shape[1]
        extra = self._forcing(width, forced, kind)
        config = self.generation_config(kind)
        if limit is not None:
            config.max_new_tokens = int(limit)
        sequences = self.model.generate(**inputs, generation_config=config, **extra)
        del inputs
        self.stats.generate_calls += 1
        self.stats.rows += len(prompt_ids)
        steps = sequences.shape[1] - width
        gens = [self._finish(row, config.max_new_tokens) for row in sequences[:, width:].tolist()]
        self._count_slots([len(ids) for ids in prompt_ids], width, steps, gens)
        return gens

    def _count_slots(self, lengths: Sequence[int], width: int, steps: int, gens: Sequence[Gen]) -> None:
        rows = len(lengths)
        self.stats.prefill_slots += rows * width
        self.stats.pad_slots += sum(width - n for n in lengths)
        self.stats.decode_slots += rows * steps
        self.stats.finished_slots += sum(max(0, steps - g.generated_tokens) for g in gens)

    def _forcing(self, width: int, rows: Sequence[tuple[PreparedPage, str]] | None, kind: str) -> dict[str, Any]:
        processors = self.generation.logits_processors(width, self.builder.penalty_start_ids())
        if self.forced_output is not None and rows:
            targets = [self.forced_output(page, key) for page, key in rows]
            processors.append(ForcedLogits(width, targets, sorted(self.eos_token_ids)))
        if not processors:
            return {}
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList(processors)}

    def _kind_limit(self, kind: str) -> int:
        return max(self.budgets.values()) if kind == "mixed" else self.budgets[kind]

    def generation_config(self, kind: str = "ocr") -> Any:
        """transformers' `GenerationConfig` for `kind` rows: the engine's decoding, end-of-turn tokens."""
        from transformers import GenerationConfig

        limit = self._kind_limit(kind)
        kwargs: dict[str, Any] = {
            "max_new_tokens": limit,
            **self.generation.config_kwargs(),
            "eos_token_id": sorted(self.eos_token_ids),
            "pad_token_id": self.builder.pad_token_id,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, limit)
        return GenerationConfig(**kwargs)


def schedule_rows(rows: Sequence[tuple[int, str]], pages: Sequence[PreparedPage], budget: int, max_rows: int
                  ) -> list[tuple[str, list[tuple[int, str]]]]:
    """The static `generate()` calls for `rows` (page index, task key): (row kind, rows) pairs, one
    kind per call in ROW_KINDS order, OCR rows longest expected output first, each kind packed by
    the visual-token budget and `max_rows`."""
    from pipeline.inference.engine import _expected_ocr_length

    calls: list[tuple[str, list[tuple[int, str]]]] = []
    for kind in ROW_KINDS:
        group = [row for row in rows if row_kind(row[1]) == kind]
        if kind == "ocr":
            group.sort(key=lambda row: -_expected_ocr_length(pages[row[0]]))  # stable for ties
        costs = [pages[i].visual_tokens for i, _ in group]
        calls.extend((kind, [group[j] for j in packed]) for packed in pack_by_budget(costs, budget, max_rows))
    return calls


__all__ = ["StaticEngine", "schedule_rows"]
