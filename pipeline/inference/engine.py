"""Generation: batches by visual-token budget, one image encoding per page for all its
tasks, greedy decoding with left padding, a token limit per kind of task, OCR routed by
page kind, out-of-memory back-off, and flags for answers that ran into their token limit
(and for those that did so by repeating themselves).

    engine = load_engine(config)
    answers = engine.answer(prepared_pages)   # same order, never raises for a page

How one batch runs: the vision encoder runs once per page (over all of its tiles);
then every task prompt of every page (description, OCR, chart yes/no) is a row of a
batched `generate` that gets the page's image features as `mm_encoder_outputs`
(transformers skips the vision encoder for them). Pages the model says hold a chart get
a second round of rows, one per chart question, reusing the same features.

Rows of different kinds never share a `generate` call: a static batch runs until its
longest row stops, so the 1-4-token chart check would otherwise wait on a 1,000-token
OCR row. Each kind runs in its own calls with its own limit (`RunConfig.task_budgets`),
OCR rows ordered by their expected length. A page whose text layer can stand in for OCR
(`pipeline.textlayer.route_ocr`) gets no OCR row at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.inference import prompts
from pipeline.inference.adapters import (
    CHART,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    input_device,
)
from pipeline.inference.batching import BatchRule, pack_by_budget
from pipeline.inference.generation import GenerationSettings
from pipeline.inference.page_engine import (  # re-exported: the names callers have imported from here
    END_OF_TURN,
    ROW_KINDS,
    BatchResult,
    EngineStats,
    ForcedOutput,
    Gen,
    PageEngine,
    budgets_for,
    row_kind,
    usage_by_group,
)
from pipeline.records import PageAnswers
from pipeline.textlayer import route_ocr

log = logging.getLogger(__name__)


class Engine(PageEngine):
    """The transformers engine: one loaded model, static batches of (page, task) rows."""

    name = "transformers"

    def __init__(
        self,
        model: Any,
        builder: InputBuilder,
        *,
        model_id: str,
        revision: str | None,
        dtype: str,
        max_new_tokens: int | Mapping[str, int],
        batch_visual_tokens: int,
        max_batch_pages: int,
        min_new_tokens: int | None = None,
        device_map: dict[str, int] | None = None,
        ocr: str = "model",
        forced_output: ForcedOutput | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        self.model = model
        self.builder = builder
        # the family's own decoding (pipeline.inference.generation) unless the run overrides it
        self.generation = generation if generation is not None else builder.generation_defaults
        self.model_id = model_id
        self.revision = revision
        self.dtype = dtype
        self.prompt_version = builder.prompt_version(self.generation)
        self.budgets = budgets_for(max_new_tokens)  # row kind -> generation limit
        self.batch_visual_tokens = batch_visual_tokens
        self.max_batch_pages = max_batch_pages
        self.batch_rule = BatchRule(batch_visual_tokens, max_batch_pages)  # how pages are grouped
        self.min_new_tokens = min_new_tokens  # benchmarks fix output lengths with this
        self.forced_output = forced_output  # benchmarks emulate realistic lengths with this
        self.ocr = ocr  # auto | model | text_layer (pipeline.textlayer.route_ocr)
        # by_kind: one kind of row per generate call. mixed: every kind in the same calls
        # with the largest limit, as before schema 1.4; only for benchmarks to compare.
        self.schedule = "by_kind"
        route_ocr(ocr, None, None)  # an unknown mode fails here, not on the first page
        self.device_map = device_map
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()

    # ---- public ----------------------------------------------------------------------
    def answer_naive(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """The reference path: one page and one task at a time, raw pixel values passed to
        `generate` (the image is encoded again for every task), as the model cards'
        quick-starts do. Same answers as `answer`; for benchmarks and tests. Raises on errors."""
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

    # ---- generation ----------------------------------------------------------------------
    def _generate_rows(
        self,
        rows: list[tuple[int, str]],
        pages: Sequence[PreparedPage],
        features: Sequence[PageFeatures],
        result: BatchResult,
    ) -> None:
        """Generate every (page, task) row: one kind of row per `generate` call (each with its
        own limit), packed by the visual-token budget, the longest expected rows together."""
        if self.schedule == "mixed":  # the pre-1.4 schedule, for benchmarks: every kind in one call
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

    def generate(
        self,
        prompt_ids: Sequence[np.ndarray],
        features: Sequence[PageFeatures],
        *,
        kind: str = "ocr",
        forced: Sequence[tuple[PreparedPage, str]] | None = None,
    ) -> list[Gen]:
        """One batched greedy `generate` over prompts whose images are already encoded,
        with the limit of `kind` rows ("mixed": the largest limit, as before 1.4)."""
        inputs = self.builder.rows_to_inputs(self.model, list(zip(prompt_ids, features, strict=True)))
        width = inputs["input_ids"].shape[1]
        extra = self._forcing(width, forced, kind)
        sequences = self.model.generate(**inputs, generation_config=self.generation_config(kind), **extra)
        del inputs  # nothing of the call outlives it but its output ids
        self.stats.generate_calls += 1
        self.stats.rows += len(prompt_ids)
        steps = sequences.shape[1] - width
        new = sequences[:, width:].tolist()
        gens = [self._finish(row, self._limit(kind)) for row in new]
        self._count_slots([len(ids) for ids in prompt_ids], width, steps, gens)
        return gens

    def _count_slots(self, lengths: Sequence[int], width: int, steps: int, gens: Sequence[Gen]) -> None:
        rows = len(lengths)
        self.stats.prefill_slots += rows * width
        self.stats.pad_slots += sum(width - n for n in lengths)
        self.stats.decode_slots += rows * steps
        self.stats.finished_slots += sum(max(0, steps - g.generated_tokens) for g in gens)

    def _forcing(self, width: int, rows: Sequence[tuple[PreparedPage, str]] | None, kind: str) -> dict[str, Any]:
        """`generate` keyword arguments: the decoding's logits processors (the family's repetition
        penalty), and ones that force each row's output (benchmarks only)."""
        processors = self.generation.logits_processors(width, self.builder.penalty_start_ids())
        if self.forced_output is not None and rows:
            targets = [self.forced_output(page, key) for page, key in rows]
            processors.append(_ForcedOutput(width, targets, sorted(self.eos_token_ids)))
        if not processors:
            return {}
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList(processors)}

    def _limit(self, kind: str) -> int:
        return max(self.budgets.values()) if kind == "mixed" else self.budgets[kind]

    def generation_config(self, kind: str = "ocr") -> Any:
        """The engine's decoding (greedy or the family's beams) up to the limit of `kind` rows,
        stopping at any end-of-turn token."""
        from transformers import GenerationConfig

        limit = self._limit(kind)
        kwargs: dict[str, Any] = {
            "max_new_tokens": limit,
            **self.generation.config_kwargs(),
            "eos_token_id": sorted(self.eos_token_ids),
            "pad_token_id": self.builder.pad_token_id,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = min(self.min_new_tokens, limit)
        return GenerationConfig(**kwargs)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(t) for t in configured)
        tokenizer = self.builder.tokenizer
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return ids



def schedule_rows(
    rows: Sequence[tuple[int, str]], pages: Sequence[PreparedPage], budget: int, max_rows: int
) -> list[tuple[str, list[tuple[int, str]]]]:
    """The `generate` calls for `rows` (page index, task key): (row kind, rows) pairs.

    One kind per call, kinds in ROW_KINDS order. OCR rows are ordered longest expected
    output first (the text layer's length when there is one, else the page's visual
    tokens), so rows of similar length share a call and fewer finished rows ride along
    with a long one. Each kind is packed by the visual-token budget and `max_rows`.
    """
    calls: list[tuple[str, list[tuple[int, str]]]] = []
    for kind in ROW_KINDS:
        group = [row for row in rows if row_kind(row[1]) == kind]
        if kind == "ocr":
            group.sort(key=lambda row: -_expected_ocr_length(pages[row[0]]))  # stable for ties
        costs = [pages[i].visual_tokens for i, _ in group]
        calls.extend((kind, [group[j] for j in packed]) for packed in pack_by_budget(costs, budget, max_rows))
    return calls


def _expected_ocr_length(page: PreparedPage) -> int:
    """A rough guess at a page's OCR length in tokens: its text layer's (about 4 characters
    a token), else its visual tokens (a larger image, more to read: a weak guess, but the
    only one a page without a text layer offers)."""
    if page.text and page.text.strip():
        return len(page.text) // 4
    return page.visual_tokens


class _ForcedOutput:
    """A logits processor that makes row r produce `targets[r]`: a length (EOS barred before
    it, forced at it) or exact ids then EOS. Emulates realistic output lengths on a tiny
    random model in benchmarks; never used for real answers."""

    def __init__(self, width: int, targets: Sequence[int | Sequence[int]], eos_ids: Sequence[int]) -> None:
        self.width = width
        self.targets = list(targets)
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self.width  # tokens generated so far
        for row, target in enumerate(self.targets):
            if isinstance(target, int):
                if step + 1 < target:
                    scores[row, self.eos_ids] = float("-inf")
                    continue
                token = self.eos_ids[0]
            else:
                token = int(target[step]) if step < len(target) else self.eos_ids[0]
            scores[row, :] = float("-inf")
            scores[row, token] = 0.0
        return scores


def load_engine(
    config: RunConfig, *, min_new_tokens: int | None = None, forced_output: ForcedOutput | None = None
) -> Engine:
    """Load `config.model` (once per process is the caller's business) and wrap it."""
    from pipeline.inference.loading import dtype_name, load_model

    loaded = load_model(config)
    return Engine(
        loaded.model,
        loaded.builder,
        model_id=loaded.model_id,
        revision=loaded.revision,
        dtype=dtype_name(loaded.dtype),
        max_new_tokens=config.task_budgets(),
        batch_visual_tokens=config.batch_visual_tokens,
        max_batch_pages=config.max_batch_pages,
        min_new_tokens=min_new_tokens,
        device_map=loaded.device_map,
        ocr=config.ocr,
        forced_output=forced_output,
        generation=loaded.builder.generation_defaults.override(config.num_beams, config.repetition_penalty),
    )


__all__ = [
    "ROW_KINDS",
    "Engine",
    "EngineStats",
    "budgets_for",
    "load_engine",
    "row_kind",
    "schedule_rows",
    "usage_by_group",
]
