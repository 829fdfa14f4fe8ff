"""CPU side of a shard: read -> rasterize -> plan tiles -> (build model inputs), per document.

`iter_document` is a generator over one document that yields `PageWork` items and ends with
one `DocumentDone`. `PrepPool` runs it in worker processes with a bounded queue (so the
model never waits for the CPU and memory stays flat) and a hard per-document timeout (a
document that hangs the renderer becomes an error row and its worker is replaced).
With zero workers it runs inline, and the timeout is checked between pages only.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.records import (
    DocStatus,
    DocTimings,
    DocumentOutcome,
    DocumentRef,
    PageFailure,
    PageImage,
    Stage,
    StageError,
    TilePlan,
)


@dataclass(slots=True)
class PageWork:
    """One page on its way to the model and the sink. `page.image` is dropped once used."""

    ref_uri: str
    doc_id: str
    page_number: int
    page: PageImage | None  # None when the page failed to render
    plan: TilePlan | None
    prepared: Any = None  # model inputs (pipeline.inference.PreparedPage) when a model is set
    error: StageError | None = None


@dataclass(slots=True)
class DocumentDone:
    """End of a document: its outcome, minus inference (the runner adds that)."""

    outcome: DocumentOutcome


@dataclass(frozen=True, slots=True)
class PrepSettings:
    """Everything a worker process needs; picklable."""

    config: RunConfig
    builder: Any = None  # pipeline.inference.InputBuilder or None


def _plan(settings: PrepSettings, width: int, height: int) -> TilePlan:
    from pipeline import tiling

    if settings.builder is not None:
        return settings.builder.plan(width, height)
    return tiling.plan_tiles(width, height, tiling.TilingOptions.from_config(settings.config))


def _strip_image(page: PageImage) -> PageImage:
    return dataclasses.replace(page, image=None, thumbnail=None)  # type: ignore[arg-type]


def iter_document(ref: DocumentRef, settings: PrepSettings) -> Iterator[PageWork | DocumentDone]:
    """Rasterize, tile and prepare every page of one document, lazily. Never raises."""
    from pipeline import rasterize, sources

    cfg = settings.config
    timings = DocTimings()
    started = time.perf_counter()
    outcome = DocumentOutcome(ref=ref, status=DocStatus.OK, timings=timings)

    def done(status: DocStatus, error: StageError | None = None) -> DocumentDone:
        outcome.status = status
        outcome.error = error
        timings.total_s = time.perf_counter() - started
        return DocumentDone(outcome)

    if ref.error is not None:
        yield done(DocStatus.ERROR, ref.error)
        return
    if ref.duplicate_of is not None:
        yield done(DocStatus.DUPLICATE)
        return

    t0 = time.perf_counter()
    try:
        data: bytes | str = sources.local_path(ref.uri) or sources.read_bytes(ref.uri, cfg.storage_options)
    except Exception as exc:  # storage errors on one file are that file's error
        yield done(DocStatus.ERROR, StageError(Stage.SOURCES, "unreadable", f"{type(exc).__name__}: {exc}"))
        return
    opened = rasterize.open_document(data, uri=ref.uri, doc_id=ref.doc_id, media_type=ref.media_type)
    timings.rasterize_s += time.perf_counter() - t0
    if isinstance(opened, StageError):
        yield done(DocStatus.ERROR, opened)
        return

    raster_options = rasterize.RasterOptions.from_config(cfg)
    with opened:
        outcome.page_count = opened.page_count
        pages = opened.pages(raster_options)
        while True:
            # Only time spent preparing counts (not time the consumer spends in the model).
            if timings.rasterize_s + timings.tiling_s > cfg.document_timeout_s:
                pages.close()
                err = StageError(
                    Stage.TIMEOUT,
                    "document_timeout",
                    f"stopped after {cfg.document_timeout_s:g} s with {outcome.pages_ok + outcome.pages_failed}"
                    f" of {outcome.page_count} pages done",
                )
                yield done(DocStatus.PARTIAL if outcome.pages_ok else DocStatus.ERROR, err)
                return
            t0 = time.perf_counter()
            try:
                item = next(pages)
            except StopIteration:
                break
            except Exception as exc:  # a rasterizer bug must not lose the document
                timings.rasterize_s += time.perf_counter() - t0
                err = StageError(Stage.RASTERIZE, "rasterize_crash", f"{type(exc).__name__}: {exc}")
                yield done(DocStatus.PARTIAL if outcome.pages_ok else DocStatus.ERROR, err)
                return
            timings.rasterize_s += time.perf_counter() - t0
            if isinstance(item, PageFailure):
                outcome.pages_failed += 1
                yield PageWork(ref.uri, ref.doc_id, item.page_number, None, None, error=item.error)
                continue
            yield _prepare_page(item, settings, timings, outcome)

    if outcome.pages_ok == 0 and outcome.pages_failed == 0:
        yield done(DocStatus.ERROR, StageError(Stage.RASTERIZE, "no_pages", "the document has no pages"))
    elif outcome.pages_failed:
        first = f"{outcome.pages_failed} of {outcome.pages_ok + outcome.pages_failed} pages failed"
        status = DocStatus.PARTIAL if outcome.pages_ok else DocStatus.ERROR
        yield done(status, StageError(Stage.RASTERIZE, "page_errors", first + " (see the pages table)"))
    else:
        yield done(DocStatus.OK)


def _prepare_page(page: PageImage, settings: PrepSettings, timings: DocTimings, outcome: DocumentOutcome) -> PageWork:
    t0 = time.perf_counter()
    try:
        plan = _plan(settings, page.render.width, page.render.height)
        prepared = settings.builder.build(page, plan) if settings.builder is not None else None
    except Exception as exc:
        timings.tiling_s += time.perf_counter() - t0
        outcome.pages_failed += 1
        err = StageError(Stage.TILING, "tiling_failed", f"{type(exc).__name__}: {exc}")
        return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), None, error=err)
    timings.tiling_s += time.perf_counter() - t0
    outcome.pages_ok += 1
    return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), plan, prepared)


# ---------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------

_STOP = None


def _worker_main(settings: PrepSettings, tasks: Any, results: Any, worker_id: int) -> None:
    while True:
        item = tasks.get()
        if item is _STOP:
            return
        index, ref = item
        results.put(("start", worker_id, index, None))
        try:
            for event in iter_document(ref, settings):
                results.put(("event", worker_id, index, event))
        except BaseException:  # pragma: no cover - iter_document never raises by design
            err = StageError(Stage.RASTERIZE, "worker_crash", traceback.format_exc(limit=3))
            results.put(("event", worker_id, index, DocumentDone(DocumentOutcome(ref, DocStatus.ERROR, error=err))))


@dataclass(slots=True)
class _Worker:
    process: Any
    tasks: Any
    current: int | None = None
    started_at: float = 0.0  # PrepPool clock when the current document started
    outstanding: list[int] = field(default_factory=list)


class PrepPool:
    """Prepare documents in worker processes, yielding their events as they come.

    Each worker takes one document at a time; results flow through one bounded queue
    (`prefetch_pages`), so workers pause when the consumer (the model) is busy. A document
    running past `document_timeout_s` gets its worker killed and replaced, and becomes a
    timeout error (pages already delivered stay, the document is then partial).

    The timeout clock only runs while the pool is waiting for or handing out results, not
    while the consumer holds the generator (busy in the model): time a worker spends blocked
    on a full queue is backpressure, not slowness.
    """

    def __init__(self, settings: PrepSettings, workers: int, *, keep_alive: bool = False) -> None:
        self.settings = settings
        self.n_workers = max(1, workers)
        self.keep_alive = keep_alive  # keep the workers for the next run (shard) instead of closing
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue(maxsize=settings.config.prefetch_pages)
        self.workers: list[_Worker] = []

    def _spawn(self, worker_id: int) -> _Worker:
        tasks = self.ctx.Queue()
        proc = self.ctx.Process(
            target=_worker_main, args=(self.settings, tasks, self.results, worker_id), daemon=True
        )
        proc.start()
        return _Worker(process=proc, tasks=tasks)

    def run(self, refs: Sequence[DocumentRef]) -> Iterator[PageWork | DocumentDone]:
        timeout = self.settings.config.document_timeout_s
        pending = list(range(len(refs)))
        finished: set[int] = set()
        delivered_ok: dict[int, int] = {}
        wanted = min(self.n_workers, len(refs))
        self.workers += [self._spawn(i) for i in range(len(self.workers), wanted)]
        for i, w in enumerate(self.workers):
            if not w.process.is_alive():  # died while idle since the last run: replace it
                w.process.join(1)
                self.workers[i] = self._spawn(i)
            self.workers[i].current, self.workers[i].outstanding = None, []
        clock = 0.0  # seconds spent inside this generator
        resumed = time.monotonic()

        def now_clock() -> float:
            return clock + (time.monotonic() - resumed)

        def feed(w: _Worker) -> None:
            if pending and not w.outstanding:
                index = pending.pop(0)
                w.outstanding.append(index)
                w.tasks.put((index, refs[index]))

        try:
            for w in self.workers:
                feed(w)
            while len(finished) < len(refs):
                try:
                    kind, wid, index, event = self.results.get(timeout=0.5)
                except queue.Empty:
                    kind = None
                if kind == "start" and index not in finished:
                    w = self.workers[wid]
                    w.current, w.started_at = index, now_clock()
                elif kind == "event":
                    if index in finished:
                        continue  # late event from a document already timed out
                    if isinstance(event, PageWork) and event.error is None:
                        delivered_ok[index] = delivered_ok.get(index, 0) + 1
                    clock = now_clock()
                    yield event
                    resumed = time.monotonic()
                    if isinstance(event, DocumentDone):
                        finished.add(index)
                        w = self.workers[wid]
                        w.outstanding.remove(index)
                        w.current = None
                        feed(w)
                # Hard timeout and dead-worker check.
                now = now_clock()
                for wid, w in enumerate(self.workers):
                    stuck = w.current is not None and now - w.started_at > timeout
                    dead = not w.process.is_alive() and bool(w.outstanding)
                    if not (stuck or dead):
                        continue
                    index = w.outstanding[0]
                    w.process.kill()
                    w.process.join(5)
                    if dead and w.current is None:
                        # It died before it started this document: not the document's fault.
                        pending.insert(0, index)
                        self.workers[wid] = self._spawn(wid)
                        feed(self.workers[wid])
                        continue
                    ok = delivered_ok.get(index, 0)
                    if stuck:
                        err = StageError(
                            Stage.TIMEOUT,
                            "document_timeout",
                            f"preparing the document took over {timeout:g} s; stopped after {ok} pages",
                        )
                    else:
                        err = StageError(
                            Stage.RASTERIZE,
                            "worker_died",
                            f"the worker process died (exit code {w.process.exitcode}) after {ok} pages",
                        )
                    outcome = DocumentOutcome(
                        ref=refs[index], status=DocStatus.PARTIAL if ok else DocStatus.ERROR, error=err
                    )
                    outcome.pages_ok = ok
                    finished.add(index)
                    w.outstanding.clear()
                    self.workers[wid] = self._spawn(wid)
                    clock = now_clock()
                    yield DocumentDone(outcome)
                    resumed = time.monotonic()
                    feed(self.workers[wid])
        except BaseException:  # includes the consumer stopping early: workers may be mid-document
            self.close()
            raise
        if not self.keep_alive:
            self.close()

    def close(self) -> None:
        for w in self.workers:
            try:
                w.tasks.put(_STOP)
            except Exception:  # pragma: no cover
                pass
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
        self.workers = []


def iter_shard_documents(refs: Sequence[DocumentRef], settings: PrepSettings) -> Iterator[PageWork | DocumentDone]:
    """All events of a shard's documents: inline when prep_workers is 0, else in a PrepPool."""
    workers = settings.config.prep_workers
    # Documents that need no rasterizing (errors, duplicates) never go to a worker.
    needs_work = [r for r in refs if r.error is None and r.duplicate_of is None]
    for ref in refs:
        if ref.error is not None or ref.duplicate_of is not None:
            yield from iter_document(ref, settings)
    if workers == 0 or not needs_work:
        for ref in needs_work:
            yield from iter_document(ref, settings)
        return
    yield from shared_pool(settings, workers).run(needs_work)


_SHARED: tuple[tuple[Any, ...], PrepPool] | None = None


def shared_pool(settings: PrepSettings, workers: int) -> PrepPool:
    """The worker pool of this process, kept across shards of the same run settings.

    Starting a worker costs seconds (unpickling a model's input builder imports torch and
    transformers), so shards of a run reuse the workers, as they reuse the loaded model.
    """
    global _SHARED
    # Workers get documents by URI, so where a run reads and writes does not matter to them.
    worker_config = settings.config.model_dump_json(exclude={"source", "output", "run_id", "limit", "progress"})
    key = (worker_config, id(settings.builder), workers)
    if _SHARED is None or _SHARED[0] != key:
        if _SHARED is not None:
            _SHARED[1].close()
        _SHARED = (key, PrepPool(settings, workers, keep_alive=True))
        atexit.register(_SHARED[1].close)
    return _SHARED[1]
