"""What both engines share: the engine seam (`PageAnswerer`, what the shard, the runner and the
flows ask of an engine) and its implementation (`PageEngine`), the kinds of (page, task)
rows and their token limits, the counters benchmarks and logs read (`EngineStats`), and how
finished rows become a page's `PageAnswers` (task keys, OCR routing, assembly). The
transformers engine (pipeline.inference.engine) and the vLLM engine
(pipeline.inference.vllm_engine) differ only in how the rows run.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.inference import prompts
from pipeline.inference.adapters import CHART, DESCRIPTION, OCR, PageBuilder, PreparedPage, chart_key
from pipeline.inference.batching import BatchRule, halves, is_repetitive, pack
from pipeline.records import TASK_USAGE_KINDS, ChartAnswer, PageAnswers, Stage, StageError, TaskOutput
from pipeline.textlayer import OcrRoute, route_ocr

log = logging.getLogger(__name__)

# End-of-turn markers of the supported chat formats; generation stops at any that exist.
END_OF_TURN = ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>")

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
    generate_calls: int = 0  # `generate()` calls (static batches; the continuous engine makes none)
    forward_calls: int = 0  # model forward passes of the continuous engine (prefills and decode steps)
    rows: int = 0  # prompts generated for (a page x a task)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    oom_splits: int = 0
    page_errors: int = 0
    # Token slots the model computed, for the waste figures. Static batches prefill every row
    # to the call's widest prompt and decode until its longest row stops; the continuous
    # engine prefills no padding and drops a row as soon as it ends (no finished slots).
    prefill_slots: int = 0  # prompt positions run through the model (padding included)
    pad_slots: int = 0  # of which left padding
    decode_slots: int = 0  # rows x tokens chosen, summed over steps (a beam group is one row)
    finished_slots: int = 0  # of which steps of rows that had already stopped
    ocr_rows_skipped: int = 0  # pages whose OCR text came from their text layer
    # Prompt tokens whose KV came from a prefix cache instead of being prefilled again: a
    # page's image (and the text around it) shared by its tasks (both engines).
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
class Gen:
    """One finished row: generated ids (before EOS) and what they say."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    generated_tokens: int
    hit_limit: bool


@dataclass
class BatchResult:
    """Finished rows of one batch, by (page index in the batch, task key)."""

    outputs: dict[tuple[int, str], Gen] = field(default_factory=dict)


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


class EngineBuilder(PageBuilder, Protocol):
    """The input builder as the engines' shared code uses it: the builder seam
    (`adapters.PageBuilder`), the run's chart questions and how an answer's ids become text."""

    @property
    def chart_questions(self) -> tuple[str, ...]: ...

    def decode_answer(self, tokens: Sequence[int]) -> str: ...


class PageAnswerer(Protocol):
    """The engine seam: what the shard (pipeline.shard.run), the runner and the flows ask of a
    loaded engine. Both engines are `PageEngine`s; a test may stand in with less machinery."""

    @property
    def builder(self) -> PageBuilder:
        """The input builder preparation builds this engine's pages with."""
        ...

    @property
    def model_id(self) -> str: ...

    @property
    def revision(self) -> str | None: ...

    @property
    def dtype(self) -> str: ...

    @property
    def prompt_version(self) -> str: ...

    @property
    def batch_rule(self) -> BatchRule:
        """How the shard batches pages for `answer` (pipeline.inference.batching)."""
        ...

    @property
    def stats(self) -> EngineStats:
        """Cumulative counters (the progress meter follows them)."""
        ...

    def answer(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """Answers for `pages`, in order, never raising for a page."""
        ...


class PageEngine:
    """The engine interface: one loaded model that answers prepared pages.

    `answer(pages)` takes one batch of pages, as made by the engine's `batch_rule`
    (pipeline.inference.batching; the shard batches by it), and returns their answers in
    order, never raising for a page. Both engines share what a page's answers are made
    of (task keys, OCR routing, assembly into `PageAnswers`); they differ in how the
    (page, task) requests are run.
    """

    name: str = ""
    builder: EngineBuilder
    model_id: str
    revision: str | None
    dtype: str
    prompt_version: str
    ocr: str
    budgets: dict[str, int]
    stats: EngineStats
    batch_rule: BatchRule
    eos_token_ids: set[int]

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
        """Pages of this model's family, batched by the batch rule (one batch when the
        shard batched them by it already), each batch with its out-of-memory back-off."""
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
        """Answers of one batch of pages of this model's family (raises on failure)."""
        raise NotImplementedError

    def _finish(self, row: list[int], limit: int) -> Gen:
        """Cut a generated row at its first EOS; decode; note whether it hit the limit."""
        stop = next((k for k, t in enumerate(row) if t in self.eos_token_ids), None)
        tokens = row if stop is None else row[:stop]
        count = len(tokens) + (0 if stop is None else 1)
        hit_limit = stop is None and len(row) >= limit
        text = self.builder.decode_answer(tokens)
        self.stats.generated_tokens += count
        return Gen(tokens=tokens, text=text, prompt_tokens=0, generated_tokens=count, hit_limit=hit_limit)

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
    def _task(self, gen: Gen) -> TaskOutput:
        return TaskOutput(
            text=gen.text,
            prompt_tokens=gen.prompt_tokens,
            generated_tokens=gen.generated_tokens,
            hit_token_limit=gen.hit_limit,
            repetitive=is_repetitive(gen.tokens, gen.hit_limit),
        )

    def _assemble(self, pages: Sequence[PreparedPage], result: BatchResult, seconds: float) -> list[PageAnswers]:
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
