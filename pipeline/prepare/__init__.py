"""CPU side of a shard: read -> rasterize -> plan tiles -> (build model inputs), per document.

`iter_document` is a generator over one document that yields `PageWork` items and ends with
one `DocumentDone`. `PrepPool` runs it in worker processes, each talking to the parent over
its own pipe, with credit-based backpressure (so the model never waits for the CPU and memory
stays flat) and a hard per-document timeout. A document whose worker dies or times out is
run again once in a fresh worker; the pool then yields a `DocumentRetry` so the consumer drops
the pages of the failed attempt. With zero workers documents run inline, and the timeout is
checked between pages only.

The package has three parts:

    document.py  one document -> page facts (`iter_document`, `PageWork`, `DocumentDone` with
                 its `DocumentOutcome`, `DocumentRetry`, `PrepSettings`): what runs inline or inside a worker
    worker.py    the worker process's side: its main loop and the message protocol
    pool.py      the parent's side: `PrepPool` (crash-tolerant, credit-based), the
                 process-wide `shared_pool`, and `iter_shard_documents`
"""

from __future__ import annotations

from pipeline.prepare.document import (
    DocumentDone,
    DocumentOutcome,
    DocumentRetry,
    PageWork,
    PrepEvent,
    PrepSettings,
    iter_document,
)
from pipeline.prepare.pool import (
    _MAIN_GUARD_HINT,
    MAX_ATTEMPTS,
    MAX_DEATHS_IN_A_ROW,
    MAX_STARTUP_DEATHS,
    STARTUP_TIMEOUT_S,
    PrepPool,
    PrepWorkersFailing,
    in_worker_bootstrap,
    iter_shard_documents,
    shared_pool,
)

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_DEATHS_IN_A_ROW",
    "MAX_STARTUP_DEATHS",
    "STARTUP_TIMEOUT_S",
    "DocumentDone",
    "DocumentOutcome",
    "DocumentRetry",
    "PageWork",
    "PrepEvent",
    "PrepPool",
    "PrepSettings",
    "PrepWorkersFailing",
    "in_worker_bootstrap",
    "iter_document",
    "iter_shard_documents",
    "shared_pool",
]
