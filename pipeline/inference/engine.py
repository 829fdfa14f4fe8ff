"""The transformers engine: continuous batching of (page, task) rows, one prefill of each
page's image for all of its tasks, out-of-memory back-off, and flags for answers that ran
into their token limit (and for those that did so by repeating themselves).

    engine = load_engine(config)
    answers = engine.answer(prepared_pages)   # same order, never raises for a page

How one batch of pages runs (the shard batches them by `batch_rule`):

1. The vision encoder runs once per page (over all of its tiles).
2. Every task of a page (description, OCR, chart check, chart questions) is a row whose
   prompt starts with the same tokens: the chat turn up to and including the image and the
   text before the question. That shared prefix is prefilled once per page, into its own
   KV cache; each row starts from a copy of it and prefills only its own suffix (rows whose
   suffixes have the same length share one call). A page whose prompts share no prefix that
   holds the whole image, or that asks a single task, prefills each row in full.
3. Rows decode together, one token per row per step, in one KV cache (rows left-padded to
   one width). A row that ends (or a beam group whose best hypothesis can no longer change)
   leaves the cache at once, and waiting rows join in its place: no step is spent on a
   finished row and the batch stays full while rows wait. A page's chart questions join as
   soon as its chart check says yes.
4. At most `max_batch_pages` rows decode at once, and at most `batch_visual_tokens` visual
   tokens' worth of rows (each row counts its page's visual tokens, as a row of the static
   batches did); a page's prefix cache lives until its last row has started.

Decoding is the family's (`pipeline.inference.generation`): greedy, or MiniCPM-V 2.0's
3 beams with repetition penalty 1.2, with each kind of row's own token limit
(`RunConfig.task_budgets`), stopping at the family's end-of-turn tokens. Token choice
reproduces transformers' `generate()` (pipeline.inference.decoding). A page whose text
layer can stand in for OCR (`pipeline.textlayer.route_ocr`) gets no OCR row at all.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.inference import kvcache, prompts
from pipeline.inference.adapters import CHART, OCR, InputBuilder, PageFeatures, PreparedPage, input_device
from pipeline.inference.attention import use_packed_decode_attention
from pipeline.inference.batching import BatchRule
from pipeline.inference.decoding import Batch, Decoding, ModelCall, Request, ScoreHook, Selection, rows_of
from pipeline.inference.generation import GenerationSettings
from pipeline.inference.page_engine import (  # re-exported: the names callers have imported from here
    END_OF_TURN,
    ROW_KINDS,
    BatchResult,
    EngineStats,
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
    """The transformers engine: one loaded model, continuously batched (page, task) rows."""

    name = "transformers"
    builder: InputBuilder

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
        generation: GenerationSettings | None = None,
        score_hook: ScoreHook | None = None,
        packed_attention: bool = True,
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
        self.batch_rule = BatchRule(batch_visual_tokens, max_batch_pages)  # how pages are batched
        self.min_new_tokens = min_new_tokens  # benchmarks fix output lengths with this
        # Called on every decoding step's scores (pipeline.inference.decoding.ScoreHook); None: plain decoding.
        self.score_hook = score_hook
        self.ocr = ocr  # auto | model | text_layer (pipeline.textlayer.route_ocr)
        route_ocr(ocr, None, None)  # an unknown mode fails here, not on the first page
        self.device_map = device_map
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()
        if packed_attention:  # decode steps read the KV cache without copying it (pipeline.inference.attention)
            use_packed_decode_attention(model)
        self.call = ModelCall(model, builder)

    # ---- pages -----------------------------------------------------------------------------
    def _answer_batch(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        import torch

        t0 = time.perf_counter()
        result = BatchResult()
        with torch.inference_mode():
            t_enc = time.perf_counter()
            features = self.builder.encode(self.model, pages)
            self.stats.encode_s += time.perf_counter() - t_enc
            self.stats.encode_calls += 1
            sources = [_Source(page.prompts, feats, page.visual_tokens, page) for page, feats in zip(pages, features)]
            del features  # each page's features go with its prefix prefill
            run = _Run(self, sources)

            def finished(request: Request, tokens: list[int]) -> None:
                i, key = request.slot
                gen = self._finish(tokens, request.limit)  # counts its tokens; the run counted them live
                gen.prompt_tokens = len(pages[i].prompts[key])
                result.outputs[(i, key)] = gen
                if key == CHART and self._chart_keys(pages[i]):
                    if prompts.parse_yes_no(gen.text):
                        for chart in reversed(self._chart_keys(pages[i])):
                            run.add(i, chart, self._limit(chart), front=True)
                    run.release(i)

            run.on_finish = finished
            for i, key in schedule(pages, [self._first_keys(page) for page in pages]):
                run.add(i, key, self._limit(key))
                if key == CHART and self._chart_keys(pages[i]):
                    run.hold(i)  # its chart questions may follow: keep the page's prefix
            run.go()
        seconds = time.perf_counter() - t0
        self.stats.model_s += seconds
        return self._assemble(pages, result, seconds)

    def _limit(self, key: str) -> int:
        return self.budgets[row_kind(key)]

    # ---- rows --------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[np.ndarray],
        features: Sequence[PageFeatures],
        *,
        kind: str = "ocr",
        limit: int | None = None,
    ) -> list[Gen]:
        """Answers of free rows (prompts whose images are already encoded), decoded like page rows
        with the limit of `kind` rows (or `limit`). Rows given the same features object share
        its prefill. Raises on failure."""
        import torch

        limit = int(limit if limit is not None else self.budgets[kind])
        by_features: dict[int, int] = {}
        sources: list[_Source] = []
        slots: list[tuple[int, str]] = []
        for j, (ids, feats) in enumerate(zip(prompt_ids, features, strict=True)):
            s = by_features.setdefault(id(feats), len(sources))
            if s == len(sources):
                sources.append(_Source({}, feats, 0, None))
            sources[s].prompts[f"row:{j}"] = np.asarray(ids)  # type: ignore[index]
            slots.append((s, f"row:{j}"))
        out: list[Gen | None] = [None] * len(slots)

        def finished(request: Request, tokens: list[int]) -> None:
            s, key = request.slot
            gen = self._finish(tokens, limit)  # counts its tokens; the run counted them live
            gen.prompt_tokens = len(sources[s].prompts[key])
            out[int(key.split(":")[1])] = gen

        t0 = time.perf_counter()
        with torch.inference_mode():
            run = _Run(self, sources, finished)
            for s, key in slots:
                run.add(s, key, limit)
            run.go()
        self.stats.model_s += time.perf_counter() - t0
        assert all(g is not None for g in out)
        return out  # type: ignore[return-value]

    def decoding(self) -> Decoding:
        return Decoding(
            num_beams=self.generation.num_beams,
            repetition_penalty=self.generation.repetition_penalty,
            eos_ids=tuple(sorted(self.eos_token_ids)),
            start_ids=tuple(self.builder.penalty_start_ids()),
            hook=self.score_hook,
        )

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


def schedule(pages: Sequence[PreparedPage], keys: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """The order rows start in: every chart check first (its verdict decides the chart
    questions, which then start next), then OCR rows longest expected output first, then
    the rest; pages in order within a kind. Long rows starting early keep the batch full
    to the end instead of leaving one long row decoding alone."""
    rows = [(i, key) for i, page_keys in enumerate(keys) for key in page_keys]
    first = {"chart_check": 0, "ocr": 1}

    def order(row: tuple[int, str]) -> tuple[int, int]:
        i, key = row
        kind = row_kind(key)
        return first.get(kind, 2), -_expected_ocr_length(pages[i]) if kind == "ocr" else 0

    return sorted(rows, key=order)  # stable: pages in order within a kind


def _expected_ocr_length(page: PreparedPage) -> int:
    """A rough guess at a page's OCR length in tokens: its text layer's (about 4 characters
    a token), else its visual tokens (a larger image, more to read: a weak guess, but the
    only one a page without a text layer offers)."""
    if page.text and page.text.strip():
        return len(page.text) // 4
    return page.visual_tokens


# ---------------------------------------------------------------------------------------
# one run of rows through the decoder
# ---------------------------------------------------------------------------------------


@dataclass
class _Source:
    """What rows are made of: prompts (by key) that show one image, its features, its cost."""

    prompts: Mapping[str, np.ndarray]
    features: PageFeatures | None
    visual_tokens: int
    page: PreparedPage | None
    shared: int = -1  # tokens of the prefix all its prompts share (computed on first use; 0: none)
    prefix: Batch | None = None  # the prefilled prefix (one row), while rows may still start from it
    uses: int = 0  # rows started from the prefix
    waiting: int = 0  # rows queued, not started
    holds: int = 0  # reasons to keep the prefix beyond the queued rows (a chart check in flight)


@dataclass
class _Run:
    """Rows of some sources through the model: queued, admitted as room frees, decoded
    together, each handed to `on_finish` (which may queue more) when it ends."""

    engine: Engine
    sources: list[_Source]
    on_finish: Callable[[Request, list[int]], None] | None = None
    queue: deque[tuple[int, str, int]] = field(default_factory=deque)
    batch: Batch | None = None
    selection: Selection | None = None
    used: int = 0  # visual tokens of the rows decoding

    def __post_init__(self) -> None:
        self.decoding = self.engine.decoding()
        self.device = input_device(self.engine.model)
        self.stats = self.engine.stats

    # ---- the queue ------------------------------------------------------------------------
    def add(self, source: int, key: str, limit: int, *, front: bool = False) -> None:
        (self.queue.appendleft if front else self.queue.append)((source, key, limit))
        self.sources[source].waiting += 1

    def hold(self, source: int) -> None:
        self.sources[source].holds += 1

    def release(self, source: int) -> None:
        self.sources[source].holds -= 1
        self._maybe_free(source)

    def _maybe_free(self, source: int) -> None:
        s = self.sources[source]
        if s.waiting == 0 and s.holds == 0:
            s.prefix = None
            s.features = None

    # ---- the loop -------------------------------------------------------------------------
    def go(self) -> None:
        rule = BatchRule(self.engine.batch_visual_tokens, self.engine.max_batch_pages)
        while self.queue or self.batch is not None:
            picked: list[tuple[int, str, int]] = []
            count, used = len(self.selection or ()), self.used
            while self.queue:
                cost = self.sources[self.queue[0][0]].visual_tokens
                if not rule.fits(count + len(picked), used, cost):
                    break
                picked.append(self.queue.popleft())
                used += cost
            if picked:
                self._start(picked)
            if self.batch is None:
                continue
            logits = self.batch.step(self.engine.call)
            self.stats.forward_calls += 1
            self._chosen(len(self.selection))  # type: ignore[arg-type]
            self._settle(self.batch, self.selection, logits)  # type: ignore[arg-type]

    def _chosen(self, requests: int) -> None:
        """A token chosen for each of `requests`: counted at once, so progress moves while rows decode."""
        self.stats.decode_slots += requests
        self.stats.generated_tokens += requests

    def _settle(self, batch: Batch, selection: Selection, logits: Any) -> None:
        """Choose every row's next token; finished requests leave (their answers handed over), the
        others reorder (beams) and carry on."""
        source, done = selection.step(logits)
        if source is not None:  # beams: each row now holds the beam it continues
            batch.reorder_beams(source, selection.count)
        finished = done.nonzero().squeeze(1).tolist()
        for g in finished:
            request = selection.requests[g]
            self.used -= self.sources[request.slot[0]].visual_tokens
            assert self.on_finish is not None
            # the answer's tokens replace the steps counted live (beams may end on a shorter hypothesis)
            self.stats.generated_tokens -= int(selection.count[g])
            self.on_finish(request, selection.result(g))
        kept = (~done).nonzero().squeeze(1)
        if finished:
            selection.keep(kept)
        if len(kept) == 0:
            if batch is self.batch:
                self.batch, self.selection = None, None
            return
        if finished:
            batch.select(rows_of(kept, selection.k))
        batch.last = selection.last_tokens().to(batch.mask.device)

    # ---- starting rows ---------------------------------------------------------------------------
    def _start(self, picked: Sequence[tuple[int, str, int]]) -> None:
        """Prefill the picked rows (their page prefixes first, if not yet), choose their first
        tokens, and add the unfinished ones to the decoding batch."""
        import torch

        parts: list[tuple[Batch, torch.Tensor, list[Request]]] = []
        by_suffix: dict[int, list[tuple[int, str, int]]] = {}
        for row in picked:
            source = self.sources[row[0]]
            source.waiting -= 1
            if self._shared(source) > 0:
                if source.prefix is None:
                    self._prefill_prefix(source)
                elif source.uses > 0:
                    self.stats.cached_prompt_tokens += source.shared
                source.uses += 1
                by_suffix.setdefault(len(source.prompts[row[1]]) - source.shared, []).append(row)
            else:
                parts.append(self._prefill_whole(row))
        for rows in by_suffix.values():
            parts.append(self._prefill_suffixes(rows))
        for row in picked:
            self._maybe_free(row[0])
        batch = Batch.concat([p[0] for p in parts])
        logits = torch.cat([p[1] for p in parts])
        requests = [r for p in parts for r in p[2]]
        self.stats.rows += len(requests)
        for r in requests:
            self.used += self.sources[r.slot[0]].visual_tokens
        k = self.decoding.num_beams
        if k > 1:  # each row becomes `k` beams, as transformers expands inputs for beam search
            index = torch.arange(len(requests), device=logits.device).repeat_interleave(k)
            batch.select(index.to(batch.mask.device))
            logits = logits.index_select(0, index)
        selection = Selection(self.decoding, requests, logits.device)
        self._chosen(len(requests))
        self._settle(batch, selection, logits)
        if len(selection) == 0:
            return
        if self.batch is None:
            self.batch, self.selection = batch, selection
        else:
            self.batch = Batch.concat([self.batch, batch])
            self.selection.extend(selection)  # type: ignore[union-attr]

    def _request(self, row: tuple[int, str, int]) -> Request:
        source, key, limit = row
        minimum = min(self.engine.min_new_tokens, limit) if self.engine.min_new_tokens else 0
        return Request(slot=(source, key), tag=(self.sources[source].page, key), limit=limit, min_new=minimum)

    def _shared(self, source: _Source) -> int:
        """Tokens of the prefix all of the source's prompts share, if it holds every image
        token and leaves each prompt at least one token of its own; else 0 (no sharing)."""
        if source.shared < 0:
            rows = list(source.prompts.values())
            shared = 0
            if len(rows) > 1:
                shortest = min(len(r) for r in rows)
                first = rows[0][:shortest]
                same = np.ones(shortest, dtype=bool)
                for r in rows[1:]:
                    same &= r[:shortest] == first
                shared = int(np.argmin(same)) if not same.all() else shortest
                shared = min(shared, shortest - 1)
                if shared < max(self.engine.builder.image_end(r) for r in rows):
                    shared = 0
            source.shared = shared
        return source.shared

    def _prefill_image(self, ids: np.ndarray, features: PageFeatures | None) -> tuple[Batch, Any]:
        """Prefill one unpadded sequence that holds the image, from an empty cache."""
        import torch

        builder = self.engine.builder
        input_ids = torch.from_numpy(np.ascontiguousarray(ids))[None].to(self.device)
        extra = builder.feature_inputs(self.engine.model, [features], input_ids) if features is not None else {}
        positions, delta = builder.prefill_positions(self.engine.model, input_ids, extra)
        mask = torch.ones_like(input_ids)
        deltas = torch.tensor([delta], dtype=torch.long, device=self.device)
        logits, cache = self.engine.call(input_ids, mask, None, deltas, None, positions=positions, **extra)  # type: ignore[arg-type]
        kvcache.check(cache)
        self.stats.forward_calls += 1
        self.stats.prefill_slots += len(ids)
        count = torch.tensor([len(ids)], dtype=torch.long, device=self.device)
        return Batch(cache=cache, mask=mask, positions=count, deltas=deltas), logits

    def _prefill_prefix(self, source: _Source) -> None:
        ids = next(iter(source.prompts.values()))[: source.shared]
        source.prefix, _ = self._prefill_image(ids, source.features)
        source.features = None  # in the prefix now

    def _prefill_whole(self, row: tuple[int, str, int]) -> tuple[Batch, Any, list[Request]]:
        source = self.sources[row[0]]
        batch, logits = self._prefill_image(source.prompts[row[1]], source.features)
        return batch, logits, [self._request(row)]

    def _prefill_suffixes(self, rows: Sequence[tuple[int, str, int]]) -> tuple[Batch, Any, list[Request]]:
        """Rows whose suffixes (after their pages' prefixes) have one length, in one call."""
        import torch

        prefixes = []
        for source_index, _, _ in rows:
            prefix = self.sources[source_index].prefix
            assert prefix is not None
            prefixes.append(Batch(cache=kvcache.expand(prefix.cache, 1), mask=prefix.mask, positions=prefix.positions,
                                  deltas=prefix.deltas))
        batch = Batch.concat(prefixes)
        suffixes = np.stack([self.sources[s].prompts[key][self.sources[s].shared :] for s, key, _ in rows])
        input_ids = torch.from_numpy(suffixes).to(self.device)
        length = input_ids.shape[1]
        mask = torch.cat((batch.mask, batch.mask.new_ones((len(rows), length))), dim=1)
        text = batch.positions[:, None] + torch.arange(length, device=self.device)[None, :]
        logits, batch.cache = self.engine.call(input_ids, mask, text, batch.deltas, batch.cache)
        batch.mask, batch.positions = mask, batch.positions + length
        self.stats.forward_calls += 1
        self.stats.prefill_slots += len(rows) * length
        return batch, logits, [self._request(row) for row in rows]


def load_engine(config: RunConfig, *, min_new_tokens: int | None = None, score_hook: ScoreHook | None = None) -> Engine:
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
        score_hook=score_hook,
        generation=loaded.builder.generation_defaults.override(config.num_beams, config.repetition_penalty),
    )


__all__ = [
    "ROW_KINDS",
    "Engine",
    "EngineStats",
    "budgets_for",
    "load_engine",
    "row_kind",
    "schedule",
    "usage_by_group",
]
