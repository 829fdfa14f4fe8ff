"""The prep worker process: its main loop, and the message protocol it shares with the pool.

Each worker has its own duplex pipe to the parent; nothing is shared between workers, so
a worker killed at any instant (even halfway through writing a message) can only close
its own pipe: the parent reads what it completed, then end-of-file. Messages are single
pickled tuples, pickled with plain pickle so each one is self-contained bytes (nothing
for the parent to fetch later from a worker that may be dead by then):

  parent -> worker   ("doc", index, attempt, ref)     run this document as this attempt
                     ("credit", n)                    you may send n more pages
                     ("stop",)                        exit
  worker -> parent   ("ready", pid)                   started, settings loaded
                     ("start", index, attempt)        began the document
                     ("need",)                        has a page ready and no credit left
                     ("page", index, attempt, PageWork)
                     ("done", index, attempt, DocumentDone)

The parent gives a worker a document only when it is idle. Credits bound the pages in
flight: the parent hands out at most `prefetch_pages` of them, and gets one back each
time the consumer takes a page, so a worker ahead of the model blocks waiting for one.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from pipeline.prepare.document import DocumentDone, PrepSettings, iter_document

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
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


def _worker_main(settings: PrepSettings, conn: Connection, parent_pid: int, use_pdeathsig: bool) -> None:
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
