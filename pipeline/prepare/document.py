"""One document -> page facts: read -> rasterize -> plan tiles -> (build model inputs).

`iter_document` is a generator over one document that yields `PageWork` items and ends with
one `DocumentDone`, whose `DocumentOutcome` reports facts only (pages prepared and failed, the
document's error, whether its bytes changed on disk): no stage labels a document, the shard's
ledger (pipeline/ledger.py) decides its status; it runs inline (zero prep workers) or inside a prep worker
(pipeline/prepare/worker.py). `DocumentRetry` is what the pool (pipeline/prepare/pool.py)
yields before it runs a document again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import RunConfig
from pipeline.ledger import DocFacts, status_of
from pipeline.records import (
    DocStatus,
    DocTimings,
    DocumentRef,
    PageFailure,
    PageImage,
    Stage,
    StageError,
    TilePlan,
)

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.adapters import PageBuilder, PreparedPage
    from pipeline.rasterize import OpenedDocument, RasterOptions

log = logging.getLogger("docpipe")


@dataclass(slots=True)
class DocumentOutcome:
    """What preparation reports about one input file: facts, never a status. The shard's
    ledger decides the documents row from these and the model's facts (`pipeline.ledger`).
    """

    ref: DocumentRef  # the file as read (its new id when it changed on disk since it was listed)
    page_count: int | None = None  # pages in the file (None when it could not be opened)
    pages_ok: int = 0  # pages prepared without error
    pages_failed: int = 0  # pages that failed in preparation
    error: StageError | None = None  # the document's own error (unreadable, timed out, worker lost, no pages...)
    timings: DocTimings = field(default_factory=DocTimings)
    attempt: int = 1  # runs that have tried this document, this one included
    open_note: str | None = None  # e.g. MuPDF had to repair the file to open it

    @property
    def duplicate(self) -> bool:
        """Same bytes as another input (its pages are that input's)."""
        return self.ref.duplicate_of is not None

    def facts(self, attempt: int | None = None) -> DocFacts:
        """These facts in the ledger's terms (preparation's part only)."""
        return DocFacts(attempt=self.attempt if attempt is None else attempt, duplicate=self.duplicate,
                        error=self.error, pages_ok=self.pages_ok, pages_failed=self.pages_failed,
                        damaged=self.open_note is not None)

    @property
    def status(self) -> DocStatus:
        """What the ledger reads these facts as, before the model and the retry policy."""
        return status_of(self.facts())


@dataclass(slots=True)
class PageWork:
    """One page on its way to the model and the sink. `page.image` is dropped once used."""

    ref_uri: str
    doc_id: str
    page_number: int
    page: PageImage | None  # None when the page failed to render
    plan: TilePlan | None
    prepared: PreparedPage | None = None  # model inputs when a model is set
    error: StageError | None = None
    # Which run of the document made this page (1, then 2 if a worker died or timed out on
    # it). After a `DocumentRetry` only pages of its attempt or a later one count.
    attempt: int = 1


@dataclass(slots=True)
class DocumentDone:
    """End of a document: its outcome, minus inference (the runner adds that)."""

    outcome: DocumentOutcome


@dataclass(slots=True)
class DocumentRetry:
    """The pool is about to run `ref_uri` again as `attempt` (its last run's worker died or
    timed out, for `reason`).

    Drop every page received for `ref_uri` whose attempt is lower than `attempt`: the new
    attempt delivers the document's pages again from the first one. Pages of an older
    attempt never arrive after this event, and the document's one `DocumentDone` follows.
    """

    ref_uri: str
    attempt: int
    reason: StageError


# What preparation yields, in order per document: its pages, a retry notice, its one end
PrepEvent = PageWork | DocumentDone | DocumentRetry


@dataclass(frozen=True, slots=True)
class PrepSettings:
    """Everything a worker process needs; picklable."""

    config: RunConfig
    builder: PageBuilder | None = None  # the model's input builder; None without a model


def _strip_image(page: PageImage) -> PageImage:
    return dataclasses.replace(page, image=None, thumbnail=None)  # type: ignore[arg-type]


def iter_document(ref: DocumentRef, settings: PrepSettings, attempt: int = 1) -> Iterator[PageWork | DocumentDone]:
    """Rasterize, tile and prepare every page of one document, lazily. Never raises.

    `attempt` is only stamped on the pages (see `PageWork.attempt`).
    """
    from pipeline import rasterize, sources

    cfg = settings.config
    timings = DocTimings()
    started = time.perf_counter()
    outcome = DocumentOutcome(ref=ref, timings=timings)
    opened: OpenedDocument | StageError | None = None

    def done(error: StageError | None = None) -> DocumentDone:
        outcome.error = error
        # e.g. MuPDF repaired the file
        outcome.open_note = opened.open_note if isinstance(opened, rasterize.OpenedDocument) else None
        timings.total_s = time.perf_counter() - started
        return DocumentDone(outcome)

    if ref.error is not None:
        yield done(ref.error)
        return
    if ref.duplicate_of is not None:  # a copy: nothing to prepare
        yield done()
        return

    t0 = time.perf_counter()
    try:
        # The bytes rendered are the bytes hashed: read once, and checked against the id.
        local = sources.local_path(ref.uri)
        if local is not None:
            with open(local, "rb") as fh:
                data: bytes = fh.read()
        else:
            data = sources.read_bytes(ref.uri, cfg.storage_options)
    except Exception as exc:  # storage errors on one file are that file's error, and may pass
        err = StageError(Stage.SOURCES, "unreadable", f"{type(exc).__name__}: {exc}", retryable=sources.is_transient(exc))
        yield done(err)
        return
    changed = sources.changed_ref(ref, data)
    if changed is not None:  # rewritten since discovery: processed as what it is now, under its new id
        log.warning("%s changed since it was listed; processing its new content (doc_id %s...)",
                    ref.uri, changed.doc_id[:12])
        ref = changed
        outcome.ref = ref
    opened = rasterize.open_document(data, uri=ref.uri, doc_id=ref.doc_id, media_type=ref.media_type)
    timings.rasterize_s += time.perf_counter() - t0
    if isinstance(opened, StageError):
        yield done(opened)
        return

    # the model owns the page geometry: with one, pages are rendered at the size its preprocessing wants
    raster_options = rasterize.RasterOptions.from_config(cfg, geometry=settings.builder)
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
                    retryable=True,  # a fact of this attempt; the ledger decides the row is final
                )
                yield done(err)
                return
            t0 = time.perf_counter()
            try:
                item = next(pages)
            except StopIteration:
                break
            except Exception as exc:  # a rasterizer bug must not lose the document
                timings.rasterize_s += time.perf_counter() - t0
                err = StageError(Stage.RASTERIZE, "rasterize_crash", f"{type(exc).__name__}: {exc}")
                yield done(err)
                return
            timings.rasterize_s += time.perf_counter() - t0
            if isinstance(item, PageFailure):
                outcome.pages_failed += 1
                yield PageWork(ref.uri, ref.doc_id, item.page_number, None, None, error=item.error, attempt=attempt)
                continue
            yield _prepare_page(item, settings.builder, raster_options, timings, outcome, attempt)

    if outcome.pages_ok == 0 and outcome.pages_failed == 0:
        yield done(StageError(Stage.RASTERIZE, "no_pages", "the document has no pages"))
    elif outcome.pages_failed:
        first = f"{outcome.pages_failed} of {outcome.pages_ok + outcome.pages_failed} pages failed"
        yield done(StageError(Stage.RASTERIZE, "page_errors", first + " (see the pages table)"))
    else:
        yield done()


def _prepare_page(page: PageImage, builder: PageBuilder | None, raster_options: RasterOptions, timings: DocTimings,
                  outcome: DocumentOutcome, attempt: int = 1) -> PageWork:
    t0 = time.perf_counter()
    try:
        plan = raster_options.plan(page.render.width, page.render.height)  # the model's plan, else the policy's
        prepared = builder.build(page, plan) if builder is not None else None
    except Exception as exc:
        timings.tiling_s += time.perf_counter() - t0
        outcome.pages_failed += 1
        err = StageError(Stage.TILING, "tiling_failed", f"{type(exc).__name__}: {exc}")
        return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), None, error=err, attempt=attempt)
    timings.tiling_s += time.perf_counter() - t0
    outcome.pages_ok += 1
    return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), plan, prepared, attempt=attempt)
