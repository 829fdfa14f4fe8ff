"""The one place a document's fate is decided, and the one place every retry budget lives.

Stages report what happened to a document as facts: whether it is a copy of another input,
its document-level error if any (unreadable, not a PDF, worker lost, timed out, no pages,
a summary of failed pages...), how many pages were prepared and failed, how many the model
failed, and every page error. No stage labels a document: this module is the only code that
sets a document's status (tests/test_ledger.py scans pipeline/ for any other writer).
`decide` turns the facts of one attempt into the document's row: status, error, page counts,
whether its page rows stand, and whether a later run tries it again. `status_of` is what the
facts alone show before the retry policy (what preparation's report reads as, e.g. in its
tests). `retry_in_run` says whether this run should try it once more first. All are pure
functions of the facts and of one `RetryPolicy`, tested with a table (tests/test_ledger.py).

The meanings of "attempt", once each:
- `RetryPolicy.worker_attempts`: a document whose prep worker died is run again in a fresh
  worker, up to this many times in all (the pool does this, asking `retry_in_fresh_worker`;
  the runner does not retry those errors again within the run).
- `RetryPolicy.timeout_attempts`: the same for a document whose preparation ran past
  `document_timeout_s` (1: not run again). A timeout is deterministic far more often than
  not (a page whose drawing is a CPU bomb times out on every try), so its row is final: later
  runs leave it alone unless asked (`--retry-timeouts`, read by `Dataset.read_state`), and one
  pathological file costs `timeout_attempts x document_timeout_s` over all runs.
- `RetryPolicy.rounds`: any other retryable failure (storage, network, a device error on
  every page) is tried up to this many times within one run, with `backoff_s` between.
- `RetryPolicy.runs`: what still fails retryably is written with `error_retryable = true`
  and no pages; the next run tries it again, up to this many runs (`documents.attempt`). On
  the last one what it got stands and is final.
- `RetryPolicy.shard_task_retries`: a Prefect shard task that raised a transient storage
  error is retried this often (exponential back-off from `shard_backoff_s`).
- `RetryPolicy.discover_task_retries`: the same for the Prefect discovery task (a fixed
  `discover_backoff_s` between tries).
- `RetryPolicy.child_run_resubmits`: a fan-out child run (one shard) that failed or crashed
  (a killed worker) is submitted again this often (the `docpipe-fanout` flow's
  `max_resubmits` parameter defaults to it).
- `RetryPolicy.device_failure_batches`: consecutive model batches failing on every page
  that stop a shard (a broken device is not retried page by page).
- `RetryPolicy.worker_deaths_in_a_row` / `worker_startup_deaths`: prep workers the pool
  replaces before it gives up on the run (`PrepWorkersFailing`): deaths with no document
  finished between, and workers that exit before they are ready, in a row.

`retry_in_later_run` is the cross-run rule as `Dataset.read_state` applies it to the rows an
output holds (which documents a new run does again).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.records import DocStatus, Stage, StageError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Every retry budget of a run (see the module docstring for what each counts)."""

    runs: int = 3
    rounds: int = 3
    backoff_s: tuple[float, ...] = (1.0, 3.0)
    worker_attempts: int = 2
    timeout_attempts: int = 1
    shard_task_retries: int = 3
    shard_backoff_s: float = 2.0
    discover_task_retries: int = 2
    discover_backoff_s: float = 2.0
    child_run_resubmits: int = 1
    device_failure_batches: int = 2
    worker_deaths_in_a_row: int = 5
    worker_startup_deaths: int = 3

    def backoff(self, round_: int) -> float:
        """Seconds to wait before in-run round `round_ + 1` (round_ counts from 0)."""
        return self.backoff_s[min(round_, len(self.backoff_s) - 1)] if self.backoff_s else 0.0


POLICY = RetryPolicy()

TIMEOUT_ERROR = "document_timeout"
# Error types the prep pool already retried in a fresh worker (see retry_in_fresh_worker).
POOL_RETRIED = frozenset({"worker_crashed", TIMEOUT_ERROR})


@dataclass(frozen=True, slots=True)
class DocFacts:
    """What the stages reported about one attempt at one document."""

    attempt: int  # runs that have tried it, this one included
    reported: bool = True  # False: preparation never reported an end (a stage broke its contract)
    duplicate: bool = False  # same bytes as another input: its pages are that input's
    original_failed: StageError | None = None  # a copy whose original (in this shard) failed: that failure
    error: StageError | None = None  # preparation's document-level error (unreadable, timed out, no pages, ...)
    pages_ok: int = 0  # pages prepared without error
    pages_failed: int = 0  # pages that failed in preparation
    model_failed: int = 0  # prepared pages the model failed on
    page_errors: tuple[StageError, ...] = ()  # every page-level error, preparation's and the model's
    damaged: bool = False  # the file was read with repairs or cut short (the documents row's open_note)
    pages_blank: int = 0  # pages that rendered blank (page_kind blank)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A document's row, as decided."""

    status: DocStatus
    error: StageError | None
    pages_ok: int
    pages_failed: int
    keep_pages: bool  # False: its page rows are dropped (the next run does them again)
    final: bool  # False: `error_retryable`, a later run tries it again

    @property
    def retryable(self) -> bool:
        return not self.final


TIMEOUT_FINAL = ("not tried again by later runs (a timeout is not transient); to try it again, rerun with "
                 "--retry-timeouts and a larger --document-timeout-s")

LOST = StageError(Stage.RASTERIZE, "lost_document", "no outcome was reported for this document", True)


def retry_in_fresh_worker(error: StageError, attempt: int, policy: RetryPolicy = POLICY,
                          worker_attempts: int | None = None) -> bool:
    """Whether the prep pool runs a document again in a fresh worker after its attempt
    `attempt` (from 1) ended in `error` (`worker_crashed` or `document_timeout`)."""
    if error.type == TIMEOUT_ERROR:
        return attempt < policy.timeout_attempts
    return attempt < (policy.worker_attempts if worker_attempts is None else worker_attempts)


def retry_in_later_run(retryable: bool, attempt: int, error_type: str | None, *, retry_timeouts: bool = False,
                       policy: RetryPolicy = POLICY) -> bool:
    """Whether a new run tries a document again, from its row in the output: the row is
    retryable (`error_retryable`) and was written before the last allowed run (`attempt <
    policy.runs`), or it is a timeout and the run asks for `--retry-timeouts`."""
    return (retryable and attempt < policy.runs) or (retry_timeouts and error_type == TIMEOUT_ERROR)


def _retryable_errors(facts: DocFacts) -> list[StageError]:
    return [e for e in ([facts.error] if facts.error else []) + list(facts.page_errors) if e.retryable]


def retry_in_run(facts: DocFacts) -> bool:
    """Whether this run should try the document again before deciding: it has a retryable
    failure, and none the pool already retried in a fresh worker."""
    if not facts.reported:
        return False
    errors = _retryable_errors(facts)
    return bool(errors) and not any(e.type in POOL_RETRIED for e in errors)


def _assess(facts: DocFacts) -> tuple[DocFacts, DocStatus, StageError | None, int, int]:
    """The facts as they count, and what they show before the retry policy: (facts, status,
    error, pages_ok, pages_failed)."""
    if not facts.reported:  # never lose a document: an error row, tried again by the next run
        facts = dataclasses.replace(facts, error=LOST, pages_ok=0, pages_failed=0, model_failed=0)
    if facts.duplicate and facts.original_failed is not None and facts.error is None:
        facts = dataclasses.replace(facts, duplicate=False, error=facts.original_failed)  # shares its original's failure
    error = facts.error
    pages_ok = facts.pages_ok - facts.model_failed
    pages_failed = facts.pages_failed + facts.model_failed
    if facts.duplicate and error is None:
        status = DocStatus.DUPLICATE
    elif error is None and not pages_failed:
        status = DocStatus.OK
    else:  # some pages (or the document) failed: partial while any page stands
        status = DocStatus.PARTIAL if pages_ok else DocStatus.ERROR
    if facts.model_failed and error is None:
        model_errors = [e for e in facts.page_errors if e.stage is Stage.INFERENCE]
        first = model_errors[0] if model_errors else StageError(Stage.INFERENCE, "generation_failed", "?")
        error = StageError(
            Stage.INFERENCE,
            "page_errors",
            f"{facts.model_failed} of {pages_ok + pages_failed} pages failed in the model (first: {first.type}: "
            f"{first.message})",
            retryable=any(e.retryable for e in facts.page_errors),
        )
    if status is DocStatus.OK and facts.damaged and facts.pages_blank:
        # A damaged file whose pages came out blank has likely lost them: say so in the status,
        # not only in open_note (the pages stand: they are what the file still holds).
        status = DocStatus.PARTIAL
        error = StageError(
            Stage.RASTERIZE,
            "damaged_blank_pages",
            f"the file is damaged (see open_note) and {facts.pages_blank} of its {pages_ok + pages_failed} pages "
            "rendered blank: their content is likely lost",
        )
    return facts, status, error, pages_ok, pages_failed


def status_of(facts: DocFacts) -> DocStatus:
    """What the facts alone show, before the retry policy (the status `decide` starts from)."""
    return _assess(facts)[1]


def decide(facts: DocFacts, policy: RetryPolicy = POLICY) -> Verdict:
    """The document's status, error, page counts, and whether its pages stand and it is final."""
    facts, status, error, pages_ok, pages_failed = _assess(facts)
    if error is not None and error.type == TIMEOUT_ERROR:  # not transient: final, the pages it got stand
        error = dataclasses.replace(error, retryable=False, message=f"{error.message}; {TIMEOUT_FINAL}")
        return Verdict(status, error, pages_ok, pages_failed, keep_pages=True, final=True)
    retryable = _retryable_errors(dataclasses.replace(facts, error=error))
    if not retryable or status is DocStatus.DUPLICATE:
        return Verdict(status, error, pages_ok, pages_failed, keep_pages=True, final=True)
    if facts.attempt < policy.runs:  # tried again by the next run: no pages kept now, so none repeat then
        err = error if error is not None and error.retryable else retryable[0]
        return Verdict(DocStatus.ERROR, dataclasses.replace(err, retryable=True), 0, 0, keep_pages=False,
                       final=False)
    # the last allowed run: what it got stands, and is final
    if error is not None:
        error = dataclasses.replace(error, retryable=False, message=f"{error.message} (after {facts.attempt} attempts)")
    return Verdict(status, error, pages_ok, pages_failed, keep_pages=True, final=True)


__all__ = ["POLICY", "POOL_RETRIED", "TIMEOUT_ERROR", "DocFacts", "RetryPolicy", "Verdict", "decide",
           "retry_in_fresh_worker", "retry_in_later_run", "retry_in_run", "status_of"]
