"""Generation: batches by visual-token budget, one image encoding per page for all its
tasks, greedy decoding with left padding, out-of-memory back-off, and flags for answers
that ran into the token limit (and for those that did so by repeating themselves).

    engine = load_engine(config)
    answers = engine.answer(prepared_pages)   # same order, never raises for a page

How one batch runs: the vision encoder runs once per page (over all of its tiles);
then every task prompt of every page (description, OCR, chart yes/no) is a row of a
batched `generate` that gets the page's image features as `mm_encoder_outputs`
(transformers skips the vision encoder for them). Pages the model says hold a chart get
a second round of rows, one per chart question, reusing the same features.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
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
from pipeline.inference.batching import halves, is_repetitive, pack_by_budget
from pipeline.records import ChartAnswer, PageAnswers, Stage, StageError, TaskOutput

log = logging.getLogger(__name__)

# End-of-turn markers of the supported chat formats; generation stops at any that exist.
_END_OF_TURN = ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>")


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


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Engine:
    """One loaded model and everything needed to answer pages with it."""

    def __init__(
        self,
        model: Any,
        builder: InputBuilder,
        *,
        model_id: str,
        revision: str | None,
        dtype: str,
        max_new_tokens: int,
        batch_visual_tokens: int,
        max_batch_pages: int,
        min_new_tokens: int | None = None,
        device_map: dict[str, int] | None = None,
    ) -> None:
        self.model = model
        self.builder = builder
        self.model_id = model_id
        self.revision = revision
        self.dtype = dtype
        self.prompt_version = prompts.PROMPT_VERSION
        self.max_new_tokens = max_new_tokens
        self.batch_visual_tokens = batch_visual_tokens
        self.max_batch_pages = max_batch_pages
        self.min_new_tokens = min_new_tokens  # benchmarks fix output lengths with this
        self.device_map = device_map
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()

    # ---- public ----------------------------------------------------------------------
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
        costs = [pages[i].visual_tokens for i in valid]
        for batch in pack_by_budget(costs, self.batch_visual_tokens, self.max_batch_pages):
            indices = [valid[j] for j in batch]
            for i, answer in self._with_backoff(indices, pages):
                results[i] = answer
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

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
                for key in (DESCRIPTION, OCR, CHART):
                    if key in page.prompts:
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
        sequences = self.model.generate(**inputs, generation_config=self.generation_config())
        self.stats.generate_calls += 1
        self.stats.rows += 1
        gen = self._finish(sequences[0, width:].tolist())
        gen.prompt_tokens = width
        return gen

    # ---- batches and back-off ----------------------------------------------------------
    def _with_backoff(self, indices: list[int], pages: Sequence[PreparedPage]) -> list[tuple[int, PageAnswers]]:
        """Run a batch; on failure split it in halves and retry, down to single pages."""
        try:
            batch = [pages[i] for i in indices]
            return list(zip(indices, self._answer_batch(batch), strict=True))
        except Exception as exc:  # noqa: BLE001 - errors become data, one page at a time
            oom = _is_oom(exc)
            if oom:
                _release_cuda_memory()
            if len(indices) > 1:
                self.stats.oom_splits += int(oom)
                log.warning("batch of %d pages failed (%s); splitting", len(indices), type(exc).__name__)
                first, second = halves(indices)
                return self._with_backoff(first, pages) + self._with_backoff(second, pages)
            self.stats.page_errors += 1
            page = pages[indices[0]]
            if oom:
                err = StageError(
                    Stage.INFERENCE,
                    "out_of_memory",
                    f"page does not fit in accelerator memory even alone ({page.visual_tokens} visual tokens)",
                )
            else:
                # Not the page's fault as far as we can tell (a device or library error): the
                # runner retries it, and stops the shard if every page fails (a broken device).
                err = StageError(Stage.INFERENCE, "generation_failed", f"{type(exc).__name__}: {exc}", retryable=True)
            log.warning("page %s#%d failed: %s", page.uri, page.page_number, err)
            return [(indices[0], self._error(err))]

    def _answer_batch(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        import torch

        t0 = time.perf_counter()
        result = _BatchResult()
        with torch.inference_mode():
            t_enc = time.perf_counter()
            features = self.builder.encode(self.model, pages)
            self.stats.encode_s += time.perf_counter() - t_enc
            self.stats.encode_calls += 1
            first = [
                (i, key) for key in (DESCRIPTION, OCR, CHART) for i, page in enumerate(pages) if key in page.prompts
            ]
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

    @staticmethod
    def _chart_keys(page: PreparedPage) -> list[str]:
        keys, q = [], 0
        while chart_key(q) in page.prompts:
            keys.append(chart_key(q))
            q += 1
        return keys

    # ---- generation ----------------------------------------------------------------------
    def _generate_rows(
        self,
        rows: list[tuple[int, str]],
        pages: Sequence[PreparedPage],
        features: Sequence[PageFeatures],
        result: _BatchResult,
    ) -> None:
        """Generate every (page, task) row, packed into `generate` calls by the token budget."""
        if not rows:
            return
        costs = [pages[i].visual_tokens for i, _ in rows]
        for group in pack_by_budget(costs, self.batch_visual_tokens, self.max_batch_pages):
            chosen = [rows[j] for j in group]
            prompt_ids = [pages[i].prompts[key] for i, key in chosen]
            generated = self.generate(prompt_ids, [features[i] for i, _ in chosen])
            for (i, key), ids, gen in zip(chosen, prompt_ids, generated, strict=True):
                gen.prompt_tokens = len(ids)
                result.outputs[(i, key)] = gen

    def generate(self, prompt_ids: Sequence[np.ndarray], features: Sequence[PageFeatures]) -> list[_Gen]:
        """One batched greedy `generate` over prompts whose images are already encoded."""
        inputs = self.builder.rows_to_inputs(self.model, list(zip(prompt_ids, features, strict=True)))
        width = inputs["input_ids"].shape[1]
        sequences = self.model.generate(**inputs, generation_config=self.generation_config())
        self.stats.generate_calls += 1
        self.stats.rows += len(prompt_ids)
        new = sequences[:, width:].tolist()
        return [self._finish(row) for row in new]

    def _finish(self, row: list[int]) -> _Gen:
        """Cut a generated row at its first EOS; decode; note whether it hit the limit."""
        stop = next((k for k, t in enumerate(row) if t in self.eos_token_ids), None)
        tokens = row if stop is None else row[:stop]
        count = len(tokens) + (0 if stop is None else 1)
        hit_limit = stop is None and len(row) >= self.max_new_tokens
        text = self.builder.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        self.stats.generated_tokens += count
        return _Gen(tokens=tokens, text=text, prompt_tokens=0, generated_tokens=count, hit_limit=hit_limit)

    def generation_config(self) -> Any:
        """Greedy decoding up to max_new_tokens, stopping at any end-of-turn token."""
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "eos_token_id": sorted(self.eos_token_ids),
            "pad_token_id": self.builder.pad_token_id,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
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
        return PageAnswers(
            model_id=self.model_id,
            model_revision=self.revision,
            model_dtype=self.dtype,
            prompt_version=self.prompt_version,
            description=description.text if description else None,
            ocr_text=ocr.text if ocr else None,
            has_chart=has_chart,
            chart_check_answer=chart.text if chart is not None else None,
            chart_answers=chart_answers,
            prompt_tokens=sum(t.prompt_tokens for t in tasks.values()),
            generated_tokens=sum(t.generated_tokens for t in tasks.values()),
            latency_s=latency,
            truncated=any(t.hit_token_limit for t in tasks.values()),
            repetitive=any(t.repetitive for t in tasks.values()),
        )

    def _error(self, error: StageError) -> PageAnswers:
        return PageAnswers(
            model_id=self.model_id,
            model_revision=self.revision,
            model_dtype=self.dtype,
            prompt_version=self.prompt_version,
            error=error,
        )


def load_engine(config: RunConfig, *, min_new_tokens: int | None = None) -> Engine:
    """Load `config.model` (once per process is the caller's business) and wrap it."""
    from pipeline.inference.loading import dtype_name, load_model

    loaded = load_model(config)
    return Engine(
        loaded.model,
        loaded.builder,
        model_id=loaded.model_id,
        revision=loaded.revision,
        dtype=dtype_name(loaded.dtype),
        max_new_tokens=config.max_new_tokens,
        batch_visual_tokens=config.batch_visual_tokens,
        max_batch_pages=config.max_batch_pages,
        min_new_tokens=min_new_tokens,
        device_map=loaded.device_map,
    )


__all__ = ["Engine", "EngineStats", "load_engine"]
