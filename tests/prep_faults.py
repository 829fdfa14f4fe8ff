"""Test-only tools for fault tests of the prep worker pool (also meant for bench/faults.py).

- `FaultyBuilder`: a picklable stand-in for the model's input builder that, inside a worker,
  can be slow, log every page it builds, and kill its own process on a chosen page of a
  chosen document (os._exit, SIGKILL, a real segfault), always or for the first N attempts.
- `StartupCrash`: a builder whose unpickling exits the process: a worker that dies at start-up.
- `collect`: applies the consumer's rule for `DocumentRetry` to a pool's events and reports
  what a runner would keep, plus every breach of the pool's promises.
- /proc helpers: is a pid alive (a zombie is not), children of a pid, wait until pids are gone.

Nothing here is imported by the pipeline; the hooks only act where a test puts them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tiling
from pipeline.prepare import DocumentDone, DocumentOutcome, DocumentRetry, PageWork


def _die(mode: str) -> None:
    if mode == "exit":
        os._exit(13)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a renderer crash would
    raise ValueError(f"unknown crash mode {mode!r}")


@dataclass(frozen=True)
class FaultyBuilder:
    """Plans tiles like the default policy; `build` may sleep, log and crash.

    `state_dir` (when set) gets one line per built page in `<name>.pages` and one line per
    attempt (page 1 built) in `<name>.starts`, written before any crash.
    """

    state_dir: str | None = None
    delay_s: float = 0.0
    delay_on: str = ""  # only pages of URIs containing this are slow ("" = all)
    delay_from_page: int = 1
    crash_on: str | None = None  # URI substring of the document that crashes its worker
    crash_page: int = 1
    crash_mode: str = "exit"  # exit | sigkill | segv | name (the word after the first "-" in the file name)
    crash_attempts: int | None = None  # crash on the first N attempts only (None: always)

    stretches_to_canvas = True  # the default tiling policy's page geometry (pipeline.tiling.PageGeometry)

    def target_size(self, width_pt: float, height_pt: float):
        return tiling.TilingOptions().target_size(width_pt, height_pt)

    def plan(self, width: int, height: int):
        return tiling.plan_tiles(width, height, tiling.TilingOptions())

    def _log(self, uri: str, suffix: str, line: str) -> int:
        if self.state_dir is None:
            return 0
        path = Path(self.state_dir) / (Path(uri).name + suffix)
        with path.open("a") as f:
            f.write(line + "\n")
        return len(path.read_text().splitlines())

    def build(self, page, plan):
        starts = self._log(page.uri, ".starts", str(os.getpid())) if page.page_number == 1 else 0
        self._log(page.uri, ".pages", f"{page.page_number} {os.getpid()}")
        if self.delay_s and self.delay_on in page.uri and page.page_number >= self.delay_from_page:
            time.sleep(self.delay_s)
        if self.crash_on is not None and self.crash_on in page.uri and page.page_number == self.crash_page:
            attempt = starts or self._count(page.uri, ".starts")
            if self.crash_attempts is None or attempt <= self.crash_attempts:
                mode = self.crash_mode
                if mode == "name":
                    mode = Path(page.uri).stem.split("-")[1]
                _die(mode)
        return {"page": page.page_number}

    def _count(self, uri: str, suffix: str) -> int:
        if self.state_dir is None:
            return 1
        path = Path(self.state_dir) / (Path(uri).name + suffix)
        return len(path.read_text().splitlines()) if path.exists() else 0

    def count(self, name: str, suffix: str) -> int:
        """Lines logged for document file `name` (".starts": attempts, ".pages": pages built)."""
        path = Path(self.state_dir or ".") / (name + suffix)
        return len(path.read_text().splitlines()) if path.exists() else 0


class StartupCrash:
    """Pickles fine; unpickling it (in a spawned worker, before the worker is ready) exits."""

    def __reduce__(self):
        return (os._exit, (17,))


@dataclass
class Received:
    """What a consumer that honours `DocumentRetry` keeps, and what the pool got wrong."""

    kept: dict[str, list[PageWork]] = field(default_factory=dict)  # uri -> pages, in arrival order
    outcomes: dict[str, list[DocumentOutcome]] = field(default_factory=dict)
    retries: dict[str, list[DocumentRetry]] = field(default_factory=dict)
    pages_seen: int = 0
    breaches: list[str] = field(default_factory=list)  # stale pages, events after done, ...

    def page_numbers(self, uri: str) -> list[int]:
        return sorted(p.page_number for p in self.kept.get(uri, []))

    def duplicates(self) -> int:
        return sum(len(v) - len({p.page_number for p in v}) for v in self.kept.values())


def collect(events: Iterable[Any], on_event: Any = None) -> Received:
    """Consume pool events as the runner should; `on_event(event, received)` runs after each."""
    got = Received()
    latest: dict[str, int] = {}
    for event in events:
        if isinstance(event, DocumentRetry):
            uri = event.ref_uri
            if uri in got.outcomes:
                got.breaches.append(f"retry after done: {uri}")
            if event.attempt <= latest.get(uri, 1):
                got.breaches.append(f"retry does not raise the attempt: {uri} {event.attempt}")
            latest[uri] = event.attempt
            got.retries.setdefault(uri, []).append(event)
            got.kept[uri] = [p for p in got.kept.get(uri, []) if p.attempt >= event.attempt]
        elif isinstance(event, DocumentDone):
            uri = event.outcome.ref.uri
            if uri in got.outcomes:
                got.breaches.append(f"second done: {uri}")
            got.outcomes.setdefault(uri, []).append(event.outcome)
        elif isinstance(event, PageWork):
            got.pages_seen += 1
            uri = event.ref_uri
            if uri in got.outcomes:
                got.breaches.append(f"page after done: {uri} p{event.page_number}")
            if event.attempt != latest.get(uri, 1):
                got.breaches.append(f"page of attempt {event.attempt}, current {latest.get(uri, 1)}: {uri}")
            got.kept.setdefault(uri, []).append(event)
        else:
            got.breaches.append(f"unknown event {type(event).__name__}")
        if on_event is not None:
            on_event(event, got)
    return got


# ---------------------------------------------------------------------------------------
# processes, via /proc (Linux)
# ---------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its new parent) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(entry.name))
    return kids


def spawned_children_of(pid: int) -> list[int]:
    """Live multiprocessing children of `pid` started with spawn (prep workers), not its
    resource tracker: for finding the workers of a `docpipe run` running in another process."""
    found = []
    for kid in children_of(pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main(" in cmdline and b"--multiprocessing-fork" in cmdline:
            found.append(kid)
    return sorted(found)


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for every pid to be dead; return those still alive."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
