"""CPU side of a shard: read -> rasterize -> plan tiles -> (build model inputs), per document.

`iter_document` is a generator over one document that yields `PageWork` items and ends with
one `DocumentDone`. `PrepPool` runs it in worker processes, each talking to the parent over
its own pipe, with credit-based backpressure (so the model never waits for the CPU and memory
stays flat) and a hard per-document timeout. A document whose worker dies or times out is
run again once in a fresh worker; the pool then yields a `DocumentRetry` so the consumer drops
the pages of the failed attempt. With zero workers documents run inline, and the timeout is
checked between pages only.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
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

from pipeline.shard.ledger import POLICY

log = logging.getLogger("docpipe")


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


def iter_document(ref: DocumentRef, settings: PrepSettings, attempt: int = 1) -> Iterator[PageWork | DocumentDone]:
    """Rasterize, tile and prepare every page of one document, lazily. Never raises.

    `attempt` is only stamped on the pages (see `PageWork.attempt`).
    """
    from pipeline import rasterize, sources

    cfg = settings.config
    timings = DocTimings()
    started = time.perf_counter()
    outcome = DocumentOutcome(ref=ref, status=DocStatus.OK, timings=timings)
    opened: Any = None

    def done(status: DocStatus, error: StageError | None = None) -> DocumentDone:
        outcome.status = status
        outcome.error = error
        outcome.open_note = getattr(opened, "open_note", None)  # e.g. MuPDF repaired the file
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
        # The bytes rendered are the bytes hashed: read once, and checked against the id.
        local = sources.local_path(ref.uri)
        if local is not None:
            with open(local, "rb") as fh:
                data: bytes = fh.read()
        else:
            data = sources.read_bytes(ref.uri, cfg.storage_options)
    except Exception as exc:  # storage errors on one file are that file's error, and may pass
        err = StageError(Stage.SOURCES, "unreadable", f"{type(exc).__name__}: {exc}", retryable=sources.is_transient(exc))
        yield done(DocStatus.ERROR, err)
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
        yield done(DocStatus.ERROR, opened)
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
                    retryable=True,  # a loaded machine may be the cause: a later run tries again
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
                yield PageWork(ref.uri, ref.doc_id, item.page_number, None, None, error=item.error, attempt=attempt)
                continue
            yield _prepare_page(item, settings, timings, outcome, attempt)

    if outcome.pages_ok == 0 and outcome.pages_failed == 0:
        yield done(DocStatus.ERROR, StageError(Stage.RASTERIZE, "no_pages", "the document has no pages"))
    elif outcome.pages_failed:
        first = f"{outcome.pages_failed} of {outcome.pages_ok + outcome.pages_failed} pages failed"
        status = DocStatus.PARTIAL if outcome.pages_ok else DocStatus.ERROR
        yield done(status, StageError(Stage.RASTERIZE, "page_errors", first + " (see the pages table)"))
    else:
        yield done(DocStatus.OK)


def _prepare_page(
    page: PageImage, settings: PrepSettings, timings: DocTimings, outcome: DocumentOutcome, attempt: int = 1
) -> PageWork:
    t0 = time.perf_counter()
    try:
        plan = _plan(settings, page.render.width, page.render.height)
        prepared = settings.builder.build(page, plan) if settings.builder is not None else None
    except Exception as exc:
        timings.tiling_s += time.perf_counter() - t0
        outcome.pages_failed += 1
        err = StageError(Stage.TILING, "tiling_failed", f"{type(exc).__name__}: {exc}")
        return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), None, error=err, attempt=attempt)
    timings.tiling_s += time.perf_counter() - t0
    outcome.pages_ok += 1
    return PageWork(page.uri, page.doc_id, page.page_number, _strip_image(page), plan, prepared, attempt=attempt)




# ---------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------
#
# Each worker has its own duplex pipe to the parent; nothing is shared between workers, so
# a worker killed at any instant (even halfway through writing a message) can only close
# its own pipe: the parent reads what it completed, then end-of-file. Messages are single
# pickled tuples, pickled with plain pickle so each one is self-contained bytes (nothing
# for the parent to fetch later from a worker that may be dead by then):
#
#   parent -> worker   ("doc", index, attempt, ref)     run this document as this attempt
#                      ("credit", n)                    you may send n more pages
#                      ("stop",)                        exit
#   worker -> parent   ("ready", pid)                   started, settings loaded
#                      ("start", index, attempt)        began the document
#                      ("need",)                        has a page ready and no credit left
#                      ("page", index, attempt, PageWork)
#                      ("done", index, attempt, DocumentDone)
#
# The parent gives a worker a document only when it is idle. Credits bound the pages in
# flight: the parent hands out at most `prefetch_pages` of them, and gets one back each
# time the consumer takes a page, so a worker ahead of the model blocks waiting for one.

MAX_ATTEMPTS = POLICY.worker_attempts  # a document whose worker dies or times out runs once more (ledger.RetryPolicy)
MAX_DEATHS_IN_A_ROW = 5  # more worker deaths than this with no document finished between: stop
MAX_STARTUP_DEATHS = 3  # workers that exit by themselves before they are ready, in a row: stop
STARTUP_TIMEOUT_S = 300.0  # a worker not ready after this long is killed (counts as a start-up death)
_POLL_S = 0.25
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_MAIN_GUARD_HINT = (
    'if you call docpipe from a Python script, put the call under `if __name__ == "__main__":` '
    "(prep workers are started with the spawn method and import the main module again; code piped "
    "to python on stdin cannot be imported: use a file), or run with --prep-workers 0"
)


class PrepWorkersFailing(RuntimeError):
    """Prep workers keep dying (at start-up, or one after another): the run cannot go on."""


def in_worker_bootstrap() -> bool:
    """True while a freshly spawned process is importing the parent's main module.

    Code that runs then is a script's top level without an `if __name__ == "__main__":`
    guard, executing a second time inside a worker; it must not start work (or workers).
    """
    return bool(getattr(mp.current_process(), "_inheriting", False))


def _send(conn: Any, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """Make sure this worker never outlives the process that started it.

    PR_SET_PDEATHSIG has the kernel SIGKILL the worker when its parent dies; strictly, when
    the parent *thread* that started it ends, so the parent asks for it only when it spawns
    from its main thread. A watchdog thread covers the rest: other platforms, pools started
    from other threads, and a parent that died before the prctl call took effect.
    """
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except Exception:  # pragma: no cover - the watchdog still works
            pass
    if os.getppid() != parent_pid:
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="docpipe-parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:  # reparented: the parent is gone
            os._exit(0)


def _worker_main(settings: PrepSettings, conn: Any, parent_pid: int, use_pdeathsig: bool) -> None:
    _die_with_parent(parent_pid, use_pdeathsig)
    # Ctrl-C reaches the whole process group; the parent handles it and stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def recv() -> tuple[Any, ...]:
        return pickle.loads(conn.recv_bytes())

    # Import the stages now, so a document's clock does not start with seconds of imports
    # (and a broken environment shows as a start-up death, not as a slow document).
    from pipeline import rasterize, sources, tiling  # noqa: F401

    credits = 0
    try:
        _send(conn, ("ready", os.getpid()))
        while True:
            message = recv()
            if message[0] == "stop":
                return
            if message[0] == "credit":
                credits += message[1]
                continue
            _, index, attempt, ref = message
            _send(conn, ("start", index, attempt))
            for event in iter_document(ref, settings, attempt):
                if isinstance(event, DocumentDone):
                    _send(conn, ("done", index, attempt, event))
                    continue
                while credits == 0:  # backpressure: wait until the consumer has taken pages
                    _send(conn, ("need",))
                    reply = recv()
                    if reply[0] == "stop":
                        return
                    if reply[0] == "credit":
                        credits += reply[1]
                credits -= 1
                _send(conn, ("page", index, attempt, event))
    except (EOFError, OSError):  # the parent closed our pipe or is gone
        return


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            return f"killed by signal {-exitcode} (exit code {exitcode})"
    return f"exited with exit code {exitcode}"


@dataclass(slots=True, eq=False)
class _Worker:
    """The parent's view of one worker process."""

    slot: int
    process: Any
    conn: Any
    spawned_at: float  # time.monotonic()
    ready: bool = False  # it said it started
    index: int | None = None  # document it was given (None: idle)
    attempt: int = 0
    started: bool = False  # it said it began that document (before: a death is not the document's fault)
    started_at: float = 0.0  # run clock when it did
    credits: int = 0  # pages it may still send
    kill_reason: str | None = None  # set when the pool killed it: "timeout", "not ready after ...", ...
    gone: bool = False  # reaped: process joined, pipe closed
    exitcode: int | None = None  # once reaped


class _Clock:
    """Seconds spent inside the pool's generator, not while the consumer holds an event.

    Time a worker spends blocked for want of credit while the model works is backpressure,
    not slowness, so it does not count against the document's timeout.
    """

    def __init__(self) -> None:
        self._spent = 0.0
        self._since: float | None = time.monotonic()

    def now(self) -> float:
        return self._spent + (time.monotonic() - self._since if self._since is not None else 0.0)

    def pause(self) -> None:
        self._spent, self._since = self.now(), None

    def resume(self) -> None:
        self._since = time.monotonic()


@dataclass(slots=True)
class _RunState:
    """One `PrepPool.run`: which documents wait, which attempt each is on, which are done."""

    refs: Sequence[DocumentRef]
    pending: deque[tuple[int, int]]  # (index, attempt) not yet given to a worker
    attempts: list[int]  # current attempt per document
    ok: list[int]  # pages delivered by the current attempt, rendered fine / failed
    failed: list[int]
    finished: set[int] = field(default_factory=set)
    clock: _Clock = field(default_factory=_Clock)
    turn: int = 0  # round-robin start among ready workers

    @classmethod
    def new(cls, refs: Sequence[DocumentRef]) -> "_RunState":
        n = len(refs)
        return cls(refs, deque((i, 1) for i in range(n)), [1] * n, [0] * n, [0] * n)


_LIVE_POOLS: "weakref.WeakSet[PrepPool]" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class PrepPool:
    """Prepare documents in worker processes, yielding their events as they come.

    Each worker takes one document at a time and sends its pages over its own pipe, as
    credit allows (at most `prefetch_pages` pages in flight overall). A worker that dies
    mid-document (a signal, the OOM killer, a renderer crash) or runs past
    `document_timeout_s` (it is killed) is replaced; its document is yielded as a
    `DocumentRetry` and runs again in the fresh worker, up to `max_attempts` in all. After
    the last attempt the document ends with a retryable `worker_crashed` or
    `document_timeout` error; the pages of that last attempt stand (status partial if any
    rendered). A worker that dies idle, or before it began its document, costs the
    document nothing. Workers that keep dying stop the run with `PrepWorkersFailing`.

    The timeout clock only runs while the pool is waiting for or handing out results, not
    while the consumer holds the generator (busy in the model).
    """

    def __init__(
        self,
        settings: PrepSettings,
        workers: int,
        *,
        keep_alive: bool = False,
        max_attempts: int = MAX_ATTEMPTS,
        max_deaths_in_a_row: int = MAX_DEATHS_IN_A_ROW,
        max_startup_deaths: int = MAX_STARTUP_DEATHS,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        if in_worker_bootstrap():
            raise PrepWorkersFailing("docpipe was started again inside one of its own prep workers; " + _MAIN_GUARD_HINT)
        self.settings = settings
        self.n_workers = max(1, workers)
        self.keep_alive = keep_alive  # keep the workers for the next run (shard) instead of closing
        self.max_attempts = max(1, max_attempts)
        self.max_deaths_in_a_row = max_deaths_in_a_row
        self.max_startup_deaths = max_startup_deaths
        self.startup_timeout_s = startup_timeout_s
        self.ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.prefetch = settings.config.prefetch_pages
        self._free = self.prefetch  # credits neither held by a worker nor riding on a page in flight
        self._share = max(1, self.prefetch // self.n_workers)  # most credits one worker holds
        self._waiting: deque[_Worker] = deque()  # workers that asked for credit and got none yet
        self._deaths_in_a_row = 0
        self._startup_deaths_in_a_row = 0
        self._running = False
        self._refs: Sequence[DocumentRef] = ()
        _LIVE_POOLS.add(self)

    # ---- introspection (tests, fault benchmarks) ----------------------------------------
    def worker_pids(self) -> list[int]:
        """Process ids of the workers the pool holds now."""
        return [w.process.pid for w in self.workers if not w.gone and w.process.pid is not None]

    def worker_pid_for(self, uri: str) -> int | None:
        """Process id of the worker that was given document `uri` in the current run, if any."""
        for w in self.workers:
            if not w.gone and w.index is not None and w.index < len(self._refs) and self._refs[w.index].uri == uri:
                return w.process.pid
        return None

    # ---- processes -----------------------------------------------------------------------
    def _spawn(self, worker_id: int) -> _Worker:
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        use_pdeathsig = threading.current_thread() is threading.main_thread()
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.settings, child_end, os.getpid(), use_pdeathsig),
            name=f"docpipe-prep-{worker_id}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            child_end.close()  # else the worker's end-of-file would never reach us
        return _Worker(slot=worker_id, process=proc, conn=parent_end, spawned_at=time.monotonic())

    def _reap(self, w: _Worker) -> None:
        """Join (or kill) a worker whose pipe has closed; take back its credits."""
        if w.gone:
            return
        w.gone = True
        w.process.join(5)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(5)
        w.exitcode = w.process.exitcode
        w.conn.close()
        self._free += w.credits
        w.credits = 0
        if w in self._waiting:
            self._waiting.remove(w)

    def _count_death(self, w: _Worker) -> None:
        if w.kill_reason == "timeout":
            return  # the pool stopped it for being slow: not a worker failing
        self._deaths_in_a_row += 1
        exited_by_itself = w.exitcode is not None and w.exitcode >= 0
        if not w.ready and (exited_by_itself or w.kill_reason is not None):
            # It exited before it was ready (no main guard, an import failing), or hung while
            # starting: it cannot start. One killed by someone else while starting (the OOM
            # killer, an operator) counts as any other death.
            self._startup_deaths_in_a_row += 1
        how = _describe_exit(w.exitcode)
        if self._startup_deaths_in_a_row >= self.max_startup_deaths:
            raise PrepWorkersFailing(
                f"prep workers died at start-up {self._startup_deaths_in_a_row} times in a row (last one {how},"
                " its error is printed above); " + _MAIN_GUARD_HINT
            )
        if self._deaths_in_a_row > self.max_deaths_in_a_row:
            raise PrepWorkersFailing(
                f"{self._deaths_in_a_row} prep workers died one after another with no document finished in between"
                f" (last one {how}); the machine may be out of memory, or the renderer crashes on every file"
            )

    def _ensure_workers(self, wanted: int) -> None:
        for slot, w in enumerate(self.workers):
            if not w.process.is_alive():  # died while idle since the last run: replace it
                self._reap(w)
                self._count_death(w)
                self.workers[slot] = self._spawn(slot)
        while len(self.workers) < wanted:
            self.workers.append(self._spawn(len(self.workers)))

    # ---- credits -------------------------------------------------------------------------
    def _grant(self, w: _Worker) -> None:
        k = min(self._free, self._share)
        try:
            _send(w.conn, ("credit", k))
        except OSError:
            return  # it died; reaping it will find out
        w.credits += k
        self._free -= k

    def _grant_waiting(self) -> None:
        while self._waiting and self._free > 0:
            w = self._waiting.popleft()
            if not w.gone:
                self._grant(w)

    # ---- documents -----------------------------------------------------------------------
    def _assign(self, w: _Worker, st: _RunState, index: int, attempt: int) -> None:
        w.index, w.attempt, w.started = index, attempt, False
        try:
            _send(w.conn, ("doc", index, attempt, st.refs[index]))
        except OSError:
            pass  # it died before it began the document; reaping it puts the document back

    def _feed(self, w: _Worker, st: _RunState) -> None:
        if w.index is None and not w.gone and w.kill_reason is None and st.pending:
            self._assign(w, st, *st.pending.popleft())

    def _failure(self, w: _Worker, st: _RunState, index: int) -> StageError:
        pages = st.ok[index] + st.failed[index]
        attempt = f"attempt {w.attempt} of {self.max_attempts}"
        if w.kill_reason == "timeout":
            return StageError(
                Stage.TIMEOUT,
                "document_timeout",
                f"preparing the document took over {self.settings.config.document_timeout_s:g} s ({attempt});"
                f" stopped after {pages} pages",
                retryable=True,
            )
        extra = f" ({w.kill_reason})" if w.kill_reason else ""
        return StageError(
            Stage.RASTERIZE,
            "worker_crashed",
            f"the prep worker {_describe_exit(w.exitcode)}{extra} on {attempt}, after {pages} pages",
            retryable=True,
        )

    def _on_exit(self, w: _Worker, st: _RunState) -> list[Any]:
        """A worker's pipe reached end-of-file: account for its document, replace it."""
        self._reap(w)
        self._count_death(w)  # may raise PrepWorkersFailing
        replacement = self._spawn(w.slot)
        self.workers[w.slot] = replacement
        events: list[Any] = []
        if w.index is not None:
            index, attempt = w.index, w.attempt
            if not w.started:  # it never began the document: not the document's fault
                st.pending.appendleft((index, attempt))
            else:
                reason = self._failure(w, st, index)
                if attempt < self.max_attempts:
                    st.attempts[index] = attempt + 1
                    st.ok[index] = st.failed[index] = 0
                    events.append(DocumentRetry(st.refs[index].uri, attempt + 1, reason))
                    self._assign(replacement, st, index, attempt + 1)
                else:  # the last attempt's pages stand; the status follows from them
                    st.finished.add(index)
                    ok, failed = st.ok[index], st.failed[index]
                    outcome = DocumentOutcome(
                        ref=st.refs[index],
                        status=DocStatus.PARTIAL if ok else DocStatus.ERROR,
                        pages_ok=ok,
                        pages_failed=failed,
                        error=reason,
                    )
                    outcome.timings.total_s = max(0.0, st.clock.now() - w.started_at)
                    events.append(DocumentDone(outcome))
        self._feed(replacement, st)
        self._grant_waiting()
        return events

    def _handle(self, w: _Worker, message: tuple[Any, ...], st: _RunState) -> list[Any]:
        kind = message[0]
        if kind == "ready":
            w.ready = True
            self._startup_deaths_in_a_row = 0
            return []
        if kind == "need":
            if w not in self._waiting:
                self._waiting.append(w)
                self._grant_waiting()
            return []
        index, attempt = message[1], message[2]
        current = (
            index == w.index and attempt == w.attempt and index not in st.finished and st.attempts[index] == attempt
        )
        if kind == "start":
            if current:
                w.started, w.started_at = True, st.clock.now()
            return []
        if kind == "page":
            w.credits -= 1
            if not current:  # a stale attempt's page never reaches the consumer
                self._free += 1
                self._grant_waiting()
                return []
            page: PageWork = message[3]
            if page.error is None:
                st.ok[index] += 1
            else:
                st.failed[index] += 1
            return [page]
        if kind == "done":
            if not current:
                return []
            st.finished.add(index)
            w.index, w.started = None, False
            self._deaths_in_a_row = 0
            self._feed(w, st)
            return [message[3]]
        raise AssertionError(f"unknown worker message {kind!r}")  # pragma: no cover

    # ---- the loop ------------------------------------------------------------------------
    def _check_timeouts(self, st: _RunState) -> float:
        """Kill workers past their deadline; return how long the next wait may last."""
        timeout = self.settings.config.document_timeout_s
        now, mono = st.clock.now(), time.monotonic()
        wait = _POLL_S
        for w in self.workers:
            if w.gone or w.kill_reason is not None:
                continue
            if w.index is not None and w.started:
                left = timeout - (now - w.started_at)
                if left <= 0:
                    w.kill_reason = "timeout"
                    w.process.kill()
                else:
                    wait = min(wait, left + 0.01)
            elif not w.ready and mono - w.spawned_at > self.startup_timeout_s:
                w.kill_reason = f"not ready after {self.startup_timeout_s:g} s"
                w.process.kill()
        return wait

    def _recv(self, w: _Worker, sentinel_only: bool) -> tuple[Any, ...] | None:
        """One message from `w`, or None at end-of-file (it exited, or its message was unreadable)."""
        try:
            if sentinel_only and not w.conn.poll(0):
                return None  # the process is gone and left nothing more
            return pickle.loads(w.conn.recv_bytes())
        except (EOFError, OSError):
            return None
        except Exception as exc:  # a message that does not unpickle: this attempt's output is broken
            w.kill_reason = w.kill_reason or f"unreadable message: {type(exc).__name__}: {exc}"
            w.process.kill()
            return None

    def _step(self, st: _RunState) -> list[Any]:
        """Wait for one worker to have something, handle one message (or its exit)."""
        wait = self._check_timeouts(st)
        handles: dict[Any, tuple[_Worker, bool]] = {}
        for w in self.workers:
            if not w.gone:
                handles[w.conn] = (w, False)
                handles[w.process.sentinel] = (w, True)
        ready = mp_connection.wait(list(handles), timeout=wait)
        if not ready:
            return []
        by_worker: dict[int, bool] = {}  # slot -> only its sentinel is ready
        for h in ready:
            w, is_sentinel = handles[h]
            by_worker[w.slot] = by_worker.get(w.slot, True) and is_sentinel
        slots = sorted(by_worker, key=lambda s: (s - st.turn) % max(1, len(self.workers)))
        st.turn += 1
        w = self.workers[slots[0]]
        message = self._recv(w, sentinel_only=by_worker[w.slot])
        if message is None:
            return self._on_exit(w, st)
        return self._handle(w, message, st)

    def run(self, refs: Sequence[DocumentRef]) -> Iterator[PageWork | DocumentDone | DocumentRetry]:
        """Events of `refs`: pages, `DocumentRetry` before a document runs again, one `DocumentDone` each."""
        if self._running:
            raise RuntimeError("this PrepPool is already running a shard")
        self._running = True
        try:
            yield from self._run(refs)
        finally:
            self._running = False

    def _run(self, refs: Sequence[DocumentRef]) -> Iterator[PageWork | DocumentDone | DocumentRetry]:
        st = _RunState.new(refs)
        self._refs = refs
        try:
            self._ensure_workers(min(self.n_workers, len(refs)))
            for w in self.workers:
                self._feed(w, st)
            while len(st.finished) < len(refs):
                for event in self._step(st):
                    st.clock.pause()
                    yield event
                    st.clock.resume()
                    if isinstance(event, PageWork):  # the consumer took it: its credit comes back
                        self._free += 1
                        self._grant_waiting()
        except BaseException:  # includes the consumer stopping early: workers may be mid-document
            self.close()
            raise
        finally:
            self._refs = ()
        if not self.keep_alive:
            self.close()

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are killed; all are joined."""
        self._waiting.clear()
        for w in self.workers:
            if w.gone:
                continue
            if w.index is not None:
                w.process.kill()
            else:
                try:
                    _send(w.conn, ("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for w in self.workers:
            if w.gone:
                continue
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
            w.gone = True
            w.exitcode = w.process.exitcode
            w.conn.close()
        self.workers = []
        self._free = self.prefetch
        # A closed pool starts afresh (a later run in a long-lived process is not blamed
        # for deaths before it); a run that hit the limits has raised already.
        self._deaths_in_a_row = self._startup_deaths_in_a_row = 0


def iter_shard_documents(
    refs: Sequence[DocumentRef], settings: PrepSettings
) -> Iterator[PageWork | DocumentDone | DocumentRetry]:
    """All events of a shard's documents: inline when prep_workers is 0, else in a PrepPool.

    Inline, no `DocumentRetry` ever comes (every page has attempt 1).
    """
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
    Its crash-loop counters live as long as it does, so they span the shards of a run.
    """
    global _SHARED
    # Workers get documents by URI, so where a run reads and writes does not matter to them.
    worker_config = settings.config.model_dump_json(exclude={"source", "output", "run_id", "limit", "progress"})
    key = (worker_config, id(settings.builder), workers)
    if _SHARED is None or _SHARED[0] != key:
        if _SHARED is not None:
            _SHARED[1].close()
        _SHARED = (key, PrepPool(settings, workers, keep_alive=True))
    return _SHARED[1]
