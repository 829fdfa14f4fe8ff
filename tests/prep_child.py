"""A small program that runs a PrepPool, for tests that kill or watch a whole process.

    python -m tests.prep_child SRC [--workers N] [--slow S] [--thread] [--kill-one] [--hard-exit]

Prints `PIDS <pid> <pid>...` (the pool's workers) after the first event, then
`DONE pages=<kept pages> docs=<documents> retries=<n> breaches=<n>` when the pool ends.
`--slow S`: every page after the first of each document takes S seconds (to be killed).
`--thread`: run the pool from a second thread (workers then rely on their watchdog).
`--kill-one`: SIGKILL the worker of the first page's document once, mid-document.
`--hard-exit`: end with os._exit(0) right after the last event (no cleanup, no finalizers).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> None:
    from pipeline import sources
    from pipeline.config import RunConfig
    from pipeline.prepare import PrepPool, PrepSettings
    from tests.prep_faults import FaultyBuilder, collect

    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--thread", action="store_true")
    ap.add_argument("--kill-one", action="store_true")
    ap.add_argument("--hard-exit", action="store_true")
    args = ap.parse_args(argv)

    refs = sources.discover(args.src, extensions=["pdf"])
    cfg = RunConfig(source=args.src, output=os.devnull, prep_workers=args.workers, progress=False)
    builder = FaultyBuilder(delay_s=args.slow, delay_from_page=2)
    pool = PrepPool(PrepSettings(cfg, builder=builder), workers=args.workers, keep_alive=True)
    killed: list[int] = []

    def on_event(event, got) -> None:
        if got.pages_seen == 1 and not killed:
            print("PIDS", *pool.worker_pids(), flush=True)
            if args.kill_one:
                pid = pool.worker_pid_for(event.ref_uri)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            else:
                killed.append(0)

    def body() -> None:
        got = collect(pool.run(refs), on_event)
        pages = sum(len(v) for v in got.kept.values())
        retries = sum(len(v) for v in got.retries.values())
        print(f"DONE pages={pages} docs={len(got.outcomes)} retries={retries} breaches={len(got.breaches)}", flush=True)

    if args.thread:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    else:
        body()
    if args.hard_exit:
        sys.stdout.flush()
        os._exit(0)
    pool.close()


if __name__ == "__main__":
    main()
