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
import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.inference import prompts
from pipeline.inference.adapters import (
    CHART,
    DESCRIPTION,
    OCR,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    chart_key,
    input_device,
)
from pipeline.inference.batching import BatchRule, halves, is_repetitive, pack, pack_by_budget
from pipeline.inference.generation import GenerationSettings
from pipeline.records import TASK_USAGE_KINDS, ChartAnswer, PageAnswers, Stage, StageError, TaskOutput
from pipeline.textlayer import OcrRoute, route_ocr

log = logging.getLogger(__name__)

# End-of-turn markers of the supported chat formats; generation stops at any that exist.
_END_OF_TURN = ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>")

# Kinds of rows, each with its own token limit and its own `generate` calls, in the
# order a batch runs them (chart answers need the chart check's verdict).
ROW_KINDS = ("chart_check", "description", "ocr", "chart_answer")
# Which pages-table usage group (records.TASK_USAGE_KINDS) each kind of row counts in.
_USAGE_GROUP = {
    "chart_check": "chart_check",
    "description": "description",
    "ocr": "ocr",
    "chart_answer": "chart_answers",
}

# A forced output for benchmarks and tests: a length (generated tokens, end token
# included) or the exact token ids to produce (the end token is added after them).
ForcedOutput = Callable[[PreparedPage, str], "int | Sequence[int]"]


def row_kind(key: str) -> str:
    """The kind of a prompt key: description, ocr, chart_check or chart_answer."""
    if key == CHART:
        return "chart_check"
    if key.startswith(f"{CHART}:"):
        return "chart_answer"
    if key in (DESCRIPTION, OCR):
        return key
    raise ValueError(f"unknown task key {key!r}")


def budgets_for(limits: int | Mapping[str, int]) -> dict[str, int]:
    """A limit per row kind from one limit for all or a mapping that names every kind."""
    if isinstance(limits, int):
        budgets = dict.fromkeys(ROW_KINDS, limits)
    else:
        missing = sorted(set(ROW_KINDS) - set(limits))
        if missing:
            raise ValueError(f"token limits missing for {missing}")
        budgets = {kind: int(limits[kind]) for kind in ROW_KINDS}
    if any(v < 1 for v in budgets.values()):
        raise ValueError(f"token limits must be at least 1: {budgets}")
    return budgets


@dataclass
class EngineStats:
    """Counters for benchmarks and logs (cumulative over the engine's life)."""

    model_s: float = 0.0  # wall seconds inside encode + generate
    encode_s: float = 0.0  # of which the vision encoder
    encode_calls: int = 0  # batches whose pages were encoded (one vision pass per page)
    generate_calls: int = 0
    rows: int = 0  # prompts generated for (a page x a task)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    oom_splits: int = 0
    page_errors: int = 0
    # Token slots the model computed, for the padding-waste figure: every row of a call
    # is prefilled to the call's widest prompt and decoded until its longest row stops.
    prefill_slots: int = 0  # rows x prompt width, summed over calls
    pad_slots: int = 0  # of which left padding
    decode_slots: int = 0  # rows x decode steps, summed over calls
    finished_slots: int = 0  # of which steps of rows that had already stopped
    ocr_rows_skipped: int = 0  # pages whose OCR text came from their text layer
    # Prompt tokens whose KV came from a prefix cache instead of being prefilled again
    # (vLLM engine: a page's image tokens shared by its tasks; the transformers engine has none).
    cached_prompt_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens served from the prefix cache."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def wasted_share(self) -> float:
        """Share of computed token slots that were padding or rows already finished."""
        total = self.prefill_slots + self.decode_slots
        return (self.pad_slots + self.finished_slots) / total if total else 0.0


@dataclass
class _Gen:
    """One finished row: generated ids (before EOS) and what they say."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    generated_tokens: int
    hit_limit: bool


@dataclass
class _BatchResult:
    """Finished rows of one batch, by (page index in the batch, task key)."""

    outputs: dict[tuple[int, str], _Gen] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    """What is kept of a failed batch's exception: no traceback, so no frames, so none of
    the batch's tensors outlive the `except` block."""

    oom: bool
    name: str
    message: str


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PageEngine:
    """The engine interface: one loaded model that answers prepared pages.

    `answer(pages)` takes one group of pages, as grouped by the engine's `batch_rule`
    (pipeline.inference.batching; the runner groups by it), and returns their answers in
    order, never raising for a page. Both engines share what a page's answers are made
    of (task keys, OCR routing, assembly into `PageAnswers`); they differ in how the
    (page, task) requests are run.
    """

    name: str = ""
    builder: Any
    model_id: str
    revision: str | None
    dtype: str
    prompt_version: str
    ocr: str
    budgets: dict[str, int]
    stats: EngineStats
    batch_rule: BatchRule

    def answer(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """Answers for `pages`, in order. A page that fails alone gets an error answer."""
        results: list[PageAnswers | None] = [None] * len(pages)
        valid: list[int] = []
        for i, page in enumerate(pages):
            if page.family != self.builder.family:
                err = StageError(
                    Stage.INFERENCE,
                    "wrong_model_family",
                    f"page prepared for {page.family!r}, the model is {self.builder.family!r}",
                )
                results[i] = self._error(err)
            else:
                valid.append(i)
        for i, answer in self._answer_valid(valid, pages):
            results[i] = answer
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _answer_valid(self, indices: list[int], pages: Sequence[PreparedPage]) -> list[tuple[int, PageAnswers]]:
        """Pages of this model's family, grouped by the batch rule (one group when the
        runner grouped them by it already), each group with its out-of-memory back-off."""
        out: list[tuple[int, PageAnswers]] = []
        for batch in pack([pages[i].visual_tokens for i in indices], self.batch_rule):
            out.extend(self._with_backoff([indices[j] for j in batch], pages))
        return out

    # ---- batches and back-off ----------------------------------------------------------
    def _with_backoff(self, indices: list[int], pages: Sequence[PreparedPage]) -> list[tuple[int, PageAnswers]]:
        """Run a batch; on failure split it in halves and retry, down to single pages.

        The halves run after the failed attempt has fully returned: an exception's
        traceback holds the frames of the failed call, and with them its inputs, image
        features and KV cache, so retrying inside the `except` block would run the halves
        with the failed batch's memory still held (and could turn a recoverable
        out-of-memory error into false out_of_memory rows).
        """
        answers, failure = self._try_batch(indices, pages)
        if failure is None:
            assert answers is not None
            return answers
        if failure.oom:
            gc.collect()  # anything of the failed batch caught in a reference cycle
            _release_cuda_memory()
        if len(indices) > 1:
            self.stats.oom_splits += int(failure.oom)
            log.warning("batch of %d pages failed (%s); splitting", len(indices), failure.name)
            first, second = halves(indices)
            return self._with_backoff(first, pages) + self._with_backoff(second, pages)
        self.stats.page_errors += 1
        page = pages[indices[0]]
        if failure.oom:
            err = StageError(
                Stage.INFERENCE,
                "out_of_memory",
                f"page does not fit in accelerator memory even alone ({page.visual_tokens} visual tokens)",
            )
        else:
            # Not the page's fault as far as we can tell (a device or library error): the
            # runner retries it, and stops the shard if every page fails (a broken device).
            err = StageError(Stage.INFERENCE, "generation_failed", f"{failure.name}: {failure.message}", retryable=True)
        log.warning("page %s#%d failed: %s", page.uri, page.page_number, err)
        return [(indices[0], self._error(err))]

    def _try_batch(
        self, indices: list[int], pages: Sequence[PreparedPage]
    ) -> tuple[list[tuple[int, PageAnswers]] | None, _Failure | None]:
        """The batch's answers, or what its failure was (the exception itself is dropped)."""
        try:
            batch = [pages[i] for i in indices]
            return list(zip(indices, self._answer_batch(batch), strict=True)), None
        except Exception as exc:  # noqa: BLE001 - errors become data, one page at a time
            return None, _Failure(oom=_is_oom(exc), name=type(exc).__name__, message=str(exc))

    def _answer_batch(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """Answers of one group of pages of this model's family (raises on failure)."""
        raise NotImplementedError

    def _finish(self, row: list[int], limit: int) -> _Gen:
        """Cut a generated row at its first EOS; decode; note whether it hit the limit."""
        stop = next((k for k, t in enumerate(row) if t in self.eos_token_ids), None)
        tokens = row if stop is None else row[:stop]
        count = len(tokens) + (0 if stop is None else 1)
        hit_limit = stop is None and len(row) >= limit
        text = self.builder.decode_answer(tokens)
        self.stats.generated_tokens += count
        return _Gen(tokens=tokens, text=text, prompt_tokens=0, generated_tokens=count, hit_limit=hit_limit)

    def ocr_route(self, page: PreparedPage) -> OcrRoute | None:
        """Where the page's OCR text comes from (None: OCR was not asked)."""
        if OCR not in page.prompts:
            return None
        return route_ocr(self.ocr, page.kind, page.text)

    def _first_keys(self, page: PreparedPage) -> list[str]:
        """The page's first-round task keys: its tasks, less OCR when the text layer stands in."""
        keys = [k for k in (DESCRIPTION, OCR, CHART) if k in page.prompts]
        route = self.ocr_route(page)
        if route is not None and route.source != "model":
            keys.remove(OCR)
            self.stats.ocr_rows_skipped += 1
        return keys

    @staticmethod
    def _chart_keys(page: PreparedPage) -> list[str]:
        keys, q = [], 0
        while chart_key(q) in page.prompts:
            keys.append(chart_key(q))
            q += 1
        return keys

    # ---- results --------------------------------------------------------------------------
    def _task(self, gen: _Gen) -> TaskOutput:
        return TaskOutput(
            text=gen.text,
            prompt_tokens=gen.prompt_tokens,
            generated_tokens=gen.generated_tokens,
            hit_token_limit=gen.hit_limit,
            repetitive=is_repetitive(gen.tokens, gen.hit_limit),
        )

    def _assemble(self, pages: Sequence[PreparedPage], result: _BatchResult, seconds: float) -> list[PageAnswers]:
        per_page: list[dict[str, TaskOutput]] = [{} for _ in pages]
        for (i, key), gen in result.outputs.items():
            per_page[i][key] = self._task(gen)
        weights = [sum(t.prompt_tokens + t.generated_tokens for t in tasks.values()) for tasks in per_page]
        total = sum(weights) or 1
        answers = []
        for i, (page, tasks) in enumerate(zip(pages, per_page, strict=True)):
            self.stats.prompt_tokens += sum(t.prompt_tokens for t in tasks.values())
            answers.append(self._page_answer(page, tasks, seconds * weights[i] / total))
        return answers

    def _page_answer(self, page: PreparedPage, tasks: dict[str, TaskOutput], latency: float) -> PageAnswers:
        chart = tasks.get(CHART)
        has_chart = prompts.parse_yes_no(chart.text) if chart is not None else None
        questions = self.builder.chart_questions
        chart_answers = tuple(
            ChartAnswer(q, tasks[chart_key(k)].text) for k, q in enumerate(questions) if chart_key(k) in tasks
        )
        description, ocr = tasks.get(DESCRIPTION), tasks.get(OCR)
        route = self.ocr_route(page)
        if route is None or route.source is None:
            ocr_text, ocr_source = None, None
        elif route.source == "text_layer":
            ocr_text, ocr_source = page.text, "text_layer"
        else:
            ocr_text, ocr_source = (ocr.text, "model") if ocr is not None else (None, None)
        return PageAnswers(
            model_id=self.model_id,
            model_revision=self.revision,
            model_dtype=self.dtype,
            prompt_version=self.prompt_version,
            description=description.text if description else None,
            ocr_text=ocr_text,
            has_chart=has_chart,
            chart_check_answer=chart.text if chart is not None else None,
            chart_answers=chart_answers,
            prompt_tokens=sum(t.prompt_tokens for t in tasks.values()),
            generated_tokens=sum(t.generated_tokens for t in tasks.values()),
            latency_s=latency,
            truncated=any(t.hit_token_limit for t in tasks.values()),
            repetitive=any(t.repetitive for t in tasks.values()),
            ocr_source=ocr_source,
            usage=usage_by_group(tasks),
        )

    def _error(self, error: StageError) -> PageAnswers:
        return PageAnswers(
            model_id=self.model_id,
            model_revision=self.revision,
            model_dtype=self.dtype,
            prompt_version=self.prompt_version,
            error=error,
        )

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
            result = _BatchResult()
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

    def _generate_naive(self, page: PreparedPage, key: str) -> _Gen:
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
        result = _BatchResult()
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
        result: _BatchResult,
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
    ) -> list[_Gen]:
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

    def _count_slots(self, lengths: Sequence[int], width: int, steps: int, gens: Sequence[_Gen]) -> None:
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
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return ids



def usage_by_group(tasks: Mapping[str, TaskOutput]) -> tuple[tuple[str, TaskOutput], ...]:
    """Token totals per pages-table usage group, in TASK_USAGE_KINDS order, for groups that ran."""
    totals: dict[str, TaskOutput] = {}
    for key, task in tasks.items():
        group = _USAGE_GROUP[row_kind(key)]
        seen = totals.get(group)
        if seen is None:
            totals[group] = dataclasses.replace(task, text=None)
        else:
            totals[group] = TaskOutput(
                text=None,
                prompt_tokens=seen.prompt_tokens + task.prompt_tokens,
                generated_tokens=seen.generated_tokens + task.generated_tokens,
                hit_token_limit=seen.hit_token_limit or task.hit_token_limit,
                repetitive=seen.repetitive or task.repetitive,
            )
    return tuple((group, totals[group]) for group in TASK_USAGE_KINDS if group in totals)


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
