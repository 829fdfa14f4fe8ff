"""One shard end to end: its documents' pages prepared (CPU), answered (model) in batches,
decided by the ledger (`pipeline.ledger`) and committed as the shard's two Parquet files.

`pipeline.runner` owns the run around it (the output's lease, discovery, the engine cache) and
re-exports what callers import from it (`process_shard`, `ShardResult`, `DeviceFailure`,
`ProgressFn`); `process_shard` here is handed the engine, or the function that loads it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from pipeline.config import RunConfig
from pipeline.dataset import Dataset, Lease
from pipeline.ledger import POLICY, DocFacts, Verdict, decide, retry_in_run
from pipeline.planning import Shard
from pipeline.prepare import (
    DocumentDone,
    DocumentOutcome,
    DocumentRetry,
    PageWork,
    PrepEvent,
    PrepSettings,
    iter_shard_documents,
)
from pipeline.records import DocStatus, DocumentRef, PageAnswers, Stage, StageError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.adapters import PreparedPage
    from pipeline.inference.page_engine import PageAnswerer

log = logging.getLogger("docpipe")

# (event, count). Events, in the order a run emits them: "model_loading" (0), "model_loaded"
# (milliseconds it took), then per shard "shard" (its documents), "prepared" (a page ready for
# the model), "prepared_document" (a document's pages all prepared), "model_start" (a batch of
# N pages handed to the model), "model_ms" and "tokens" (that batch's model time and generated
# tokens), "page" (a page's row recorded: answered, or not for the model), "document" (a
# document's row). pipeline.progress.ProgressMeter turns them into pages/s, tokens/s, busy
# share and ETA.
ProgressFn = Callable[[str, int], None]

__all__ = ["Counts", "DeviceFailure", "ProgressFn", "ShardResult", "process_shard"]


class DeviceFailure(RuntimeError):
    """The model failed on every page of consecutive batches: the device (or model) is broken."""



@dataclass(slots=True, kw_only=True)
class Counts:
    """What a shard or a run did; shard counts add up to run counts."""

    documents: int = 0
    pages: int = 0
    pages_ok: int = 0
    pages_failed: int = 0
    documents_by_status: dict[str, int] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    model_seconds: float = 0.0

    def add(self, other: "Counts", *, seconds: bool = False) -> None:
        self.documents += other.documents
        self.pages += other.pages
        self.pages_ok += other.pages_ok
        self.pages_failed += other.pages_failed
        self.model_seconds += other.model_seconds
        if seconds:
            self.seconds += other.seconds
        for mine, theirs in ((self.documents_by_status, other.documents_by_status), (self.errors_by_type, other.errors_by_type)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True, kw_only=True)
class ShardResult(Counts):
    shard_id: str
    skipped: bool = False


@dataclass(slots=True)
class _DocState:
    attempt: int = 1  # the pool's attempt whose pages count
    outcome: DocumentOutcome | None = None  # set when preparation of the document has ended
    pending: int = 0  # pages waiting for the model
    rows: list[dict[str, Any]] = field(default_factory=list)  # page rows of the current attempt
    errors: list[StageError] = field(default_factory=list)  # page errors of the current attempt
    failed_in_model: int = 0
    model_s: float = 0.0


# Every retry budget is in pipeline.ledger.RetryPolicy (POLICY); this is the model's.
DEVICE_FAILURE_BATCHES = POLICY.device_failure_batches  # consecutive batches failing on every page stop the shard


class _ShardRun:
    """State of one shard in progress: rows collected, documents waiting for their pages.

    It collects facts; the ledger (`pipeline.ledger.decide`) decides each document's
    row once its pages are answered (`_verdict`).
    """

    def __init__(
        self, shard: Shard, config: RunConfig, run_id: str, engine: PageAnswerer | None, progress: ProgressFn | None
    ) -> None:
        self.shard, self.config, self.run_id = shard, config, run_id
        self.engine, self.progress = engine, progress
        self.fingerprint = config.fingerprint()
        self.states: dict[str, _DocState] = {ref.uri: _DocState() for ref in shard.refs}
        self.batch: list[PageWork] = []
        self.batch_tokens = 0
        self.model_seconds = 0.0
        self.failed_batches = 0

    # ---- events --------------------------------------------------------------------
    def on_event(self, event: PrepEvent) -> None:
        if isinstance(event, DocumentDone):
            state = self.states[event.outcome.ref.uri]
            state.outcome = event.outcome
            if self.progress:
                self.progress("prepared_document", 1)
        elif isinstance(event, DocumentRetry):
            self.restart(event.ref_uri, event.attempt)
        else:
            self.on_page(event)

    def restart(self, uri: str, attempt: int) -> None:
        """Forget everything of `uri` before `attempt` (its pages come again)."""
        self.batch = [w for w in self.batch if w.ref_uri != uri]
        self.batch_tokens = sum(w.plan.visual_tokens for w in self.batch if w.plan)
        self.states[uri] = _DocState(attempt=attempt)

    def on_page(self, work: PageWork) -> None:
        state = self.states[work.ref_uri]
        if work.attempt < state.attempt:
            return  # a page of an attempt that was given up
        if self.progress:
            self.progress("prepared", 1)
        if self.engine is None or work.error is not None or work.prepared is None:
            self._record_page(work, None)
            return
        state.pending += 1
        # The one batching rule (pipeline.inference.batching): the engine's. A page that
        # does not fit closes the batch before it; a batch nothing more can join goes at once.
        rule = self.engine.batch_rule
        cost = work.plan.visual_tokens if work.plan else 0
        if not rule.fits(len(self.batch), self.batch_tokens, cost):
            self.answer_batch()
        self.batch.append(work)
        self.batch_tokens += cost
        if rule.full(len(self.batch), self.batch_tokens):
            self.answer_batch()

    def answer_batch(self) -> None:
        """Hand the held batch of pages to the engine, which answers it as one batch."""
        batch, self.batch, self.batch_tokens = self.batch, [], 0
        if not batch:
            return
        assert self.engine is not None  # pages are held only for an engine
        pages = cast("list[PreparedPage]", [w.prepared for w in batch])  # held pages all have inputs
        t0 = time.perf_counter()
        if self.progress:
            self.progress("model_start", len(batch))
        try:
            answers = self.engine.answer(pages)
        except Exception as exc:  # the engine handles page errors itself; last line of defence
            err = StageError(Stage.INFERENCE, "engine_failure", f"{type(exc).__name__}: {exc}", retryable=True)
            answers = [self._failed_answer(err) for _ in batch]
        self.model_seconds += time.perf_counter() - t0
        if self.progress:
            self.progress("model_ms", int(1000 * (time.perf_counter() - t0)))
            self.progress("tokens", sum(a.generated_tokens for a in answers))
        failed = [a.error for a in answers if a.error is not None]
        if len(failed) == len(answers) and all(e.retryable for e in failed):
            self.failed_batches += 1
            if self.failed_batches >= DEVICE_FAILURE_BATCHES:
                raise DeviceFailure(
                    f"the model failed on every page of {self.failed_batches} consecutive batches "
                    f"({failed[0].type}: {failed[0].message}); stopping (nothing of shard {self.shard.shard_id} "
                    "was committed; a rerun resumes)"
                )
        else:
            self.failed_batches = 0
        for work, ans in zip(batch, answers, strict=True):
            work.prepared = None  # free the tensors now
            state = self.states[work.ref_uri]
            state.pending -= 1
            state.model_s += ans.latency_s
            state.failed_in_model += int(ans.error is not None)
            self._record_page(work, ans)

    def retry_candidates(self) -> list[str]:
        """Documents to run again in this run (the ledger's `retry_in_run`)."""
        return [uri for uri, state in self.states.items() if state.outcome is not None
                and retry_in_run(self._facts(uri, state))]

    def _facts(self, uri: str, state: _DocState) -> DocFacts:
        """What the stages reported about the current attempt at `uri`, for the ledger."""
        attempt = self.shard.attempt_of(uri)
        if state.outcome is None:
            return DocFacts(attempt=attempt, reported=False)
        return dataclasses.replace(state.outcome.facts(attempt), model_failed=state.failed_in_model,
                                   page_errors=tuple(state.errors),
                                   pages_blank=sum(row.get("page_kind") == "blank" for row in state.rows))

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ShardResult]:
        """Final rows of the shard: (pages, documents) and its counts."""
        self.answer_batch()
        decided: dict[str, tuple[DocumentOutcome, Verdict]] = {}
        pages: list[dict[str, Any]] = []
        # originals first: a copy whose original failed takes that failure (a fact for the ledger)
        for ref in sorted(self.shard.refs, key=lambda r: r.duplicate_of is not None):
            original = decided.get(ref.duplicate_of or "")
            failed = None
            if original is not None and original[1].status is DocStatus.ERROR and original[1].error is not None:
                failed = dataclasses.replace(original[1].error,
                                             message=f"same bytes as {original[0].ref.uri}: {original[1].error.message}")
            outcome, verdict, rows = self._verdict(ref, self.states[ref.uri], original_failed=failed)
            decided[ref.uri] = (outcome, verdict)
            pages.extend(rows)
        docs = [self._document_row(*decided[r.uri]) for r in self.shard.refs]
        pages.sort(key=lambda row: (row["source_uri"], row["page_number"]))
        docs.sort(key=lambda row: row["source_uri"])
        return pages, docs, self._counts(pages, docs)

    # ---- helpers -------------------------------------------------------------------
    def _verdict(self, ref: DocumentRef, state: _DocState, *, original_failed: StageError | None = None
                 ) -> tuple[DocumentOutcome, Verdict, list[dict[str, Any]]]:
        """The ledger's verdict on the document (`pipeline.ledger.decide`), with what
        preparation reported of it and the page rows that stand."""
        facts = dataclasses.replace(self._facts(ref.uri, state), original_failed=original_failed)
        verdict = decide(facts, POLICY)
        outcome = state.outcome or DocumentOutcome(ref=ref)
        outcome.attempt = facts.attempt
        outcome.timings.inference_s += state.model_s
        outcome.timings.total_s += state.model_s  # preparation wall time + its share of the model
        if not verdict.keep_pages:
            return outcome, verdict, []
        return outcome, verdict, [{**r, "error_retryable": False if r["error_retryable"] else r["error_retryable"]}
                                  for r in state.rows]

    def _failed_answer(self, err: StageError) -> PageAnswers:
        e = self.engine
        assert e is not None  # only pages handed to an engine get here
        return PageAnswers(model_id=e.model_id, model_revision=e.revision, model_dtype=e.dtype,
                           prompt_version=e.prompt_version, error=err)

    def _record_page(self, work: PageWork, answers: PageAnswers | None) -> None:
        from pipeline import sink

        state = self.states[work.ref_uri]
        if work.attempt < state.attempt:
            return
        state.rows.append(
            sink.page_row(
                doc_id=work.doc_id,
                source_uri=work.ref_uri,
                page_number=work.page_number,
                page=work.page,
                plan=work.plan,
                answers=answers,
                error=work.error,
                shard_id=self.shard.shard_id,
                run_id=self.run_id,
                fingerprint=self.fingerprint,
            )
        )
        error = work.error or (answers.error if answers is not None else None)
        if error is not None:
            state.errors.append(error)
        if self.progress:
            self.progress("page", 1)

    def _document_row(self, outcome: DocumentOutcome, verdict: Verdict) -> dict[str, Any]:
        from pipeline import sink

        if self.progress:
            self.progress("document", 1)
        return sink.document_row(
            outcome,
            verdict,
            shard_id=self.shard.shard_id,
            run_id=self.run_id,
            fingerprint=self.fingerprint,
            processed_at=datetime.now(timezone.utc),
        )

    def _counts(self, pages: list[dict[str, Any]], docs: list[dict[str, Any]]) -> ShardResult:
        r = ShardResult(shard_id=self.shard.shard_id, model_seconds=self.model_seconds)
        r.documents = len(docs)
        r.pages = len(pages)
        for row in pages:
            if row["status"] == "ok":
                r.pages_ok += 1
            else:
                r.pages_failed += 1
                r.errors_by_type[row["error_type"]] = r.errors_by_type.get(row["error_type"], 0) + 1
        for row in docs:
            status = row["status"]
            r.documents_by_status[status] = r.documents_by_status.get(status, 0) + 1
            # Page-level errors are counted per page; count document-level ones here.
            if row["error_type"] and status != "duplicate" and (
                (row["pages_ok"] == 0 and row["pages_failed"] == 0) or row["error_stage"] == Stage.TIMEOUT.value
            ):
                r.errors_by_type[row["error_type"]] = r.errors_by_type.get(row["error_type"], 0) + 1
        return r


def process_shard(
    shard: Shard,
    config: RunConfig,
    *,
    run_id: str,
    engine: PageAnswerer | None = None,
    progress: ProgressFn | None = None,
    dataset: Dataset | None = None,
    lease: Lease | None = None,
    load_engine: Callable[[RunConfig], PageAnswerer | None] | None = None,
) -> ShardResult:
    """Process one shard and commit its two Parquet files (idempotent: done shards are skipped).

    Documents with a retryable failure are tried again within the shard (with back-off)
    before their rows are decided. With a `lease`, nothing is committed once the output
    belongs to another run (LeaseLost). Raises only for a broken configuration, a broken
    device (DeviceFailure) or a storage failure writing the output; bad documents and
    pages become rows. A run with a model and no `engine` loads it with `load_engine`
    (`pipeline.runner.process_shard` passes its `get_engine`, the per-process cache).
    """
    dataset = dataset or Dataset(config.output, config.storage_options)
    t_start = time.perf_counter()
    if progress:
        progress("shard", len(shard.refs))
    if dataset.shard_done(shard.shard_id):
        dataset.delete_plan(shard.shard_id)
        if progress:
            progress("document", len(shard.refs))
        return ShardResult(shard_id=shard.shard_id, documents=len(shard.refs), skipped=True)
    if config.model is not None and engine is None:
        if load_engine is None:
            raise ValueError("process_shard: a run with a model needs its engine or load_engine")
        engine = load_engine(config)
    settings = PrepSettings(config=config, builder=engine.builder if engine is not None else None)
    state = _ShardRun(shard, config, run_id, engine, progress)
    refs = list(shard.refs)
    for round_ in range(POLICY.rounds):
        for event in iter_shard_documents(refs, settings):
            state.on_event(event)
        state.answer_batch()
        again = set(state.retry_candidates()) if round_ < POLICY.rounds - 1 else set()
        if not again:
            break
        delay = POLICY.backoff(round_)
        log.warning("shard %s: %d documents failed transiently; trying them again in %.0f s",
                    shard.shard_id, len(again), delay)
        time.sleep(delay)
        for uri in again:
            state.restart(uri, 1)  # the pool numbers attempts from 1 on each run
        refs = [r for r in shard.refs if r.uri in again]
    pages, docs, result = state.finish()
    from pipeline import sink
    from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

    dataset.commit_shard(
        shard.shard_id,
        sink.rows_to_table(pages, PAGES_SCHEMA),
        sink.rows_to_table(docs, DOCUMENTS_SCHEMA),
        lease=lease,
        supersedes=shard.retried(),
        replaces=[(d["source_uri"], d["replaces_doc_id"]) for d in docs
                  if d.get("replaces_doc_id") is not None and d["replaces_doc_id"] != d["doc_id"]
                  and not d["error_retryable"]],
    )
    result.seconds = time.perf_counter() - t_start
    return result
