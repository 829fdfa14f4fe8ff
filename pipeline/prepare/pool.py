"""The parent's side of the prep workers: a crash-tolerant pool that runs documents in
worker processes (pipeline/prepare/worker.py) with credit-based backpressure and a hard
per-document timeout, the process-wide pool shared across a run's shards, and
`iter_shard_documents`, which runs a shard's documents inline or in that pool.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from pipeline.ledger import POLICY, TIMEOUT_ERROR, retry_in_fresh_worker
from pipeline.prepare.document import (
    DocumentDone,
    DocumentOutcome,
    DocumentRetry,
    PageWork,
    PrepEvent,
    PrepSettings,
    iter_document,
)
from pipeline.prepare.worker import _send, _worker_main
from pipeline.records import DocumentRef, Stage, StageError

# The pool's budgets, from the ledger's RetryPolicy (their one home):
MAX_ATTEMPTS = POLICY.worker_attempts  # a document whose worker dies runs once more
MAX_DEATHS_IN_A_ROW = POLICY.worker_deaths_in_a_row  # more worker deaths than this, no document finished between: stop
MAX_STARTUP_DEATHS = POLICY.worker_startup_deaths  # workers that exit by themselves before they are ready, in a row
STARTUP_TIMEOUT_S = 300.0  # a worker not ready after this long is killed (counts as a start-up death)
_POLL_S = 0.25
_MAIN_GUARD_HINT = (
    'if you call docpipe from a Python script, put the call under `if __name__ == "__main__":` '
    "(prep workers are started with the spawn method and import the main module again; code piped "
    "to python on stdin cannot be imported: use a file), or run with --prep-workers 0"
)


class PrepWorkersFailing(RuntimeError):
    """Prep workers keep dying (at start-up, or one after another): the run cannot go on."""

    # The public name: tracebacks and pickles call it pipeline.prepare.PrepWorkersFailing.
    __module__ = "pipeline.prepare"


def in_worker_bootstrap() -> bool:
    """True while a freshly spawned process is importing the parent's main module.

    Code that runs then is a script's top level without an `if __name__ == "__main__":`
    guard, executing a second time inside a worker; it must not start work (or workers).
    """
    return bool(getattr(mp.current_process(), "_inheriting", False))


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
    process: BaseProcess
    conn: Connection
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
    `document_timeout_s` (it is killed) is replaced; a crashed worker's document is yielded
    as a `DocumentRetry` and runs again in the fresh worker, up to `max_attempts` in all (a
    timed-out one as the ledger's `retry_in_fresh_worker` says: by default not again). After
    the last attempt the document ends with a `worker_crashed` or `document_timeout` error; the pages of that last attempt stand (the ledger makes it
    partial if any rendered). A worker that dies idle, or before it began its document, costs the
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
            of = POLICY.timeout_attempts
            return StageError(
                Stage.TIMEOUT,
                TIMEOUT_ERROR,
                f"preparing the document took over {self.settings.config.document_timeout_s:g} s"
                f"{f' (attempt {w.attempt} of {of})' if of > 1 else ''}; stopped after {pages} pages",
                retryable=True,  # a fact of this attempt; the ledger decides the row is final
            )
        extra = f" ({w.kill_reason})" if w.kill_reason else ""
        return StageError(
            Stage.RASTERIZE,
            "worker_crashed",
            f"the prep worker {_describe_exit(w.exitcode)}{extra} on {attempt}, after {pages} pages",
            retryable=True,
        )

    def _on_exit(self, w: _Worker, st: _RunState) -> list[PrepEvent]:
        """A worker's pipe reached end-of-file: account for its document, replace it."""
        self._reap(w)
        self._count_death(w)  # may raise PrepWorkersFailing
        replacement = self._spawn(w.slot)
        self.workers[w.slot] = replacement
        events: list[PrepEvent] = []
        if w.index is not None:
            index, attempt = w.index, w.attempt
            if not w.started:  # it never began the document: not the document's fault
                st.pending.appendleft((index, attempt))
            else:
                reason = self._failure(w, st, index)
                if retry_in_fresh_worker(reason, attempt, worker_attempts=self.max_attempts):
                    st.attempts[index] = attempt + 1
                    st.ok[index] = st.failed[index] = 0
                    events.append(DocumentRetry(st.refs[index].uri, attempt + 1, reason))
                    self._assign(replacement, st, index, attempt + 1)
                else:  # the last attempt's pages stand; the ledger decides from them and the reason
                    st.finished.add(index)
                    outcome = DocumentOutcome(
                        ref=st.refs[index], pages_ok=st.ok[index], pages_failed=st.failed[index], error=reason
                    )
                    outcome.timings.total_s = max(0.0, st.clock.now() - w.started_at)
                    events.append(DocumentDone(outcome))
        self._feed(replacement, st)
        self._grant_waiting()
        return events

    def _handle(self, w: _Worker, message: tuple[Any, ...], st: _RunState) -> list[PrepEvent]:
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

    def _step(self, st: _RunState) -> list[PrepEvent]:
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

    def run(self, refs: Sequence[DocumentRef]) -> Iterator[PrepEvent]:
        """Events of `refs`: pages, `DocumentRetry` before a document runs again, one `DocumentDone` each."""
        if self._running:
            raise RuntimeError("this PrepPool is already running a shard")
        self._running = True
        try:
            yield from self._run(refs)
        finally:
            self._running = False

    def _run(self, refs: Sequence[DocumentRef]) -> Iterator[PrepEvent]:
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
) -> Iterator[PrepEvent]:
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
