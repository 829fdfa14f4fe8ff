"""Process shards end to end: prepare pages (CPU), answer them (model), write Parquet.

The same functions serve `docpipe run` (all shards in this process) and the Prefect
flows (one task or child flow run per shard). The model is loaded once per process
(`get_engine`) and reused across shards.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import RunConfig
from pipeline.planning import Shard, ShardPlan, plan_shards
from pipeline.prepare import DocumentDone, PageWork, PrepSettings, iter_shard_documents
from pipeline.records import DocStatus, DocumentOutcome, DocumentRef, PageAnswers, Stage, StageError

log = logging.getLogger("docpipe")

ProgressFn = Callable[[str, int], None]  # (event, count): "page" / "document"

__all__ = [
    "Shard",
    "ShardResult",
    "WorkPlan",
    "RunSummary",
    "discover_work",
    "process_shard",
    "get_engine",
    "run",
    "summarize",
    "new_run_id",
]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkPlan:
    refs: tuple[DocumentRef, ...]
    shards: tuple[Shard, ...]
    total_documents: int
    already_done: int
    discover_s: float

    @property
    def to_do(self) -> int:
        return sum(len(s.refs) for s in self.shards)


def discover_work(config: RunConfig) -> WorkPlan:
    """List and hash the source, read what the output already holds, cut the rest into shards."""
    from pipeline import sink, sources

    t0 = time.perf_counter()
    # A pages file without its documents file is a shard killed between its two writes; it
    # would show up as duplicate pages to readers that glob the folder, so it goes. This
    # assumes one run per output at a time (the deployments set a concurrency limit of 1);
    # fanned-out shard runs never call this.
    sink.clean_orphans(config.output, config.storage_options)
    done = sink.read_done(config.output, config.storage_options)
    refs = sources.discover(
        config.source,
        extensions=config.extensions,
        storage_options=config.storage_options,
        limit=config.limit,
        known=done.known,  # unchanged files already recorded are not read again
    )
    processed: dict[str, str] = {}
    for uri, doc_id in sorted(done.doc_keys):
        if doc_id in done.doc_ids_with_pages:
            processed.setdefault(doc_id, uri)
    plan: ShardPlan = plan_shards(
        refs,
        done_keys=done.doc_keys,
        processed_elsewhere=processed,
        shard_size=config.shard_size,
        fingerprint=config.fingerprint(),
    )
    return WorkPlan(
        refs=tuple(refs),
        shards=plan.shards,
        total_documents=len(refs),
        already_done=plan.already_done,
        discover_s=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------
# Engine cache: one model per process
# ---------------------------------------------------------------------------------------

_ENGINES: dict[tuple[Any, ...], Any] = {}


def _engine_key(config: RunConfig) -> tuple[Any, ...]:
    return (
        config.model,
        config.revision,
        config.dtype,
        config.device,
        config.gpu_memory_headroom,
        config.trust_remote_code,
        tuple(config.tasks),
        tuple(config.all_chart_questions()),
        config.max_new_tokens,
        config.batch_visual_tokens,
        config.max_batch_pages,
        config.max_tiles,
        config.min_tiles,
    )


def get_engine(config: RunConfig) -> Any | None:
    """The inference engine for this configuration, loaded once per process (None without a model)."""
    if config.model is None:
        return None
    key = _engine_key(config)
    engine = _ENGINES.get(key)
    if engine is None:
        from pipeline.inference import load_engine

        _ENGINES.clear()  # one model in memory at a time
        log.info("loading model %s", config.model)
        engine = load_engine(config)
        _ENGINES[key] = engine
    return engine


# ---------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------


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
    outcome: DocumentOutcome | None = None  # set when preparation of the document has ended
    pending: int = 0  # pages waiting for the model
    failed_in_model: int = 0
    model_s: float = 0.0


class _ShardRun:
    """State of one shard in progress: rows collected, documents waiting for their pages."""

    def __init__(
        self, shard: Shard, config: RunConfig, run_id: str, engine: Any | None, progress: ProgressFn | None
    ) -> None:
        self.shard, self.config, self.run_id = shard, config, run_id
        self.engine, self.progress = engine, progress
        self.fingerprint = config.fingerprint()
        self.result = ShardResult(shard_id=shard.shard_id)
        self.states: dict[str, _DocState] = {ref.uri: _DocState() for ref in shard.refs}
        self.page_rows: list[dict[str, Any]] = []
        self.doc_rows: list[dict[str, Any]] = []
        self.window: list[PageWork] = []
        self.window_tokens = 0

    # ---- events --------------------------------------------------------------------
    def on_page(self, work: PageWork) -> None:
        if self.engine is None or work.error is not None or work.prepared is None:
            self._record_page(work, None)
            return
        self.states[work.ref_uri].pending += 1
        self.window.append(work)
        self.window_tokens += work.plan.visual_tokens if work.plan else 0
        if len(self.window) >= self.config.max_batch_pages or self.window_tokens >= self.config.batch_visual_tokens:
            self.answer_window()

    def on_document(self, outcome: DocumentOutcome) -> None:
        self.states[outcome.ref.uri].outcome = outcome
        self._maybe_finish(outcome.ref.uri)

    def answer_window(self) -> None:
        window, self.window, self.window_tokens = self.window, [], 0
        if not window:
            return
        t0 = time.perf_counter()
        try:
            answers = self.engine.answer([w.prepared for w in window])
        except Exception as exc:  # the engine handles page errors itself; last line of defence
            err = StageError(Stage.INFERENCE, "engine_failure", f"{type(exc).__name__}: {exc}")
            answers = [self._failed_answer(err) for _ in window]
        self.result.model_seconds += time.perf_counter() - t0
        for work, ans in zip(window, answers, strict=True):
            work.prepared = None  # free the tensors now
            state = self.states[work.ref_uri]
            state.pending -= 1
            state.model_s += ans.latency_s
            state.failed_in_model += int(ans.error is not None)
            self._record_page(work, ans)
        for uri in dict.fromkeys(w.ref_uri for w in window):
            self._maybe_finish(uri)

    def finish(self) -> ShardResult:
        self.answer_window()
        for uri, state in list(self.states.items()):
            if state.outcome is None:  # only if a stage broke its contract: never lose a document
                ref = next(r for r in self.shard.refs if r.uri == uri)
                err = StageError(Stage.RASTERIZE, "lost_document", "no outcome was reported for this document")
                state.outcome = DocumentOutcome(ref=ref, status=DocStatus.ERROR, error=err)
                state.pending = 0
                self._maybe_finish(uri)
        self._write()
        return self.result

    # ---- helpers -------------------------------------------------------------------
    def _failed_answer(self, err: StageError) -> PageAnswers:
        e = self.engine
        return PageAnswers(
            model_id=str(getattr(e, "model_id", "?")),
            model_revision=getattr(e, "revision", None),
            model_dtype=str(getattr(e, "dtype", "?")),
            prompt_version=str(getattr(e, "prompt_version", "?")),
            error=err,
        )

    def _record_page(self, work: PageWork, answers: PageAnswers | None) -> None:
        from pipeline import sink

        self.page_rows.append(
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
        r = self.result
        r.pages += 1
        if error is None:
            r.pages_ok += 1
        else:
            r.pages_failed += 1
            r.errors_by_type[error.type] = r.errors_by_type.get(error.type, 0) + 1
        if self.progress:
            self.progress("page", 1)

    def _maybe_finish(self, uri: str) -> None:
        from pipeline import sink

        state = self.states.get(uri)
        if state is None or state.outcome is None or state.pending:
            return
        outcome = state.outcome
        outcome.timings.inference_s += state.model_s
        if state.failed_in_model:
            outcome.pages_ok -= state.failed_in_model
            outcome.pages_failed += state.failed_in_model
            if outcome.status is DocStatus.OK:
                total = outcome.pages_ok + outcome.pages_failed
                outcome.status = DocStatus.PARTIAL if outcome.pages_ok else DocStatus.ERROR
                outcome.error = StageError(
                    Stage.INFERENCE,
                    "page_errors",
                    f"{state.failed_in_model} of {total} pages failed in the model (see the pages table)",
                )
        self.doc_rows.append(
            sink.document_row(
                outcome,
                shard_id=self.shard.shard_id,
                run_id=self.run_id,
                fingerprint=self.fingerprint,
                processed_at=datetime.now(timezone.utc),
            )
        )
        r = self.result
        r.documents += 1
        r.documents_by_status[outcome.status.value] = r.documents_by_status.get(outcome.status.value, 0) + 1
        err = outcome.error
        if err is not None and outcome.status is not DocStatus.DUPLICATE:
            # Page-level errors are already counted per page; count document-level ones here.
            if (outcome.pages_ok == 0 and outcome.pages_failed == 0) or err.stage is Stage.TIMEOUT:
                r.errors_by_type[err.type] = r.errors_by_type.get(err.type, 0) + 1
        del self.states[uri]
        if self.progress:
            self.progress("document", 1)

    def _write(self) -> None:
        from pipeline import sink
        from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

        self.page_rows.sort(key=lambda row: (row["source_uri"], row["page_number"]))
        self.doc_rows.sort(key=lambda row: row["source_uri"])
        sink.write_shard(
            self.config.output,
            self.shard.shard_id,
            sink.rows_to_table(self.page_rows, PAGES_SCHEMA),
            sink.rows_to_table(self.doc_rows, DOCUMENTS_SCHEMA),
            self.config.storage_options,
        )


def process_shard(
    shard: Shard,
    config: RunConfig,
    *,
    run_id: str,
    engine: Any | None = None,
    progress: ProgressFn | None = None,
) -> ShardResult:
    """Process one shard and write its two Parquet files (idempotent: done shards are skipped).

    Raises only for a broken configuration or a storage failure writing the output; bad
    documents and pages become rows.
    """
    from pipeline import sink

    t_start = time.perf_counter()
    if sink.shard_done(config.output, shard.shard_id, config.storage_options):
        if progress:
            progress("document", len(shard.refs))
        return ShardResult(shard_id=shard.shard_id, documents=len(shard.refs), skipped=True)
    if config.model is not None and engine is None:
        engine = get_engine(config)
    settings = PrepSettings(config=config, builder=engine.builder if engine is not None else None)
    state = _ShardRun(shard, config, run_id, engine, progress)
    for event in iter_shard_documents(shard.refs, settings):
        if isinstance(event, DocumentDone):
            state.on_document(event.outcome)
        else:
            state.on_page(event)
    result = state.finish()
    result.seconds = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class RunSummary(Counts):
    run_id: str
    output: str
    model: str | None
    total_documents: int = 0
    already_done: int = 0
    shards: int = 0
    shards_skipped: int = 0

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    def as_table_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"metric": "documents discovered", "value": self.total_documents},
            {"metric": "documents already done (skipped)", "value": self.already_done},
            {"metric": "documents processed", "value": self.documents},
        ]
        rows += [{"metric": f"documents {k}", "value": v} for k, v in sorted(self.documents_by_status.items())]
        rows += [
            {"metric": "pages", "value": self.pages},
            {"metric": "pages ok", "value": self.pages_ok},
            {"metric": "pages failed", "value": self.pages_failed},
        ]
        rows += [{"metric": f"error: {k}", "value": v} for k, v in sorted(self.errors_by_type.items())]
        rows += [
            {"metric": "shards written", "value": self.shards - self.shards_skipped},
            {"metric": "shards skipped (already done)", "value": self.shards_skipped},
            {"metric": "seconds", "value": round(self.seconds, 2)},
            {"metric": "pages/s", "value": round(self.pages_per_s, 2)},
            {"metric": "model", "value": self.model or "none (model columns left null)"},
            {"metric": "output", "value": self.output},
        ]
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pages_per_s"] = self.pages_per_s
        return data


def summarize(
    results: Iterable[ShardResult],
    *,
    run_id: str,
    config: RunConfig,
    seconds: float,
    total_documents: int = 0,
    already_done: int = 0,
) -> RunSummary:
    summary = RunSummary(
        run_id=run_id,
        output=config.output,
        model=config.model,
        total_documents=total_documents,
        already_done=already_done,
        seconds=seconds,
    )
    for r in results:
        summary.shards += 1
        summary.shards_skipped += int(r.skipped)
        if r.skipped:
            summary.already_done += r.documents
        else:
            summary.add(r)
    return summary


def run(config: RunConfig, *, progress: ProgressFn | None = None, on_plan: Callable[[WorkPlan], None] | None = None) -> RunSummary:
    """Discover, plan and process every shard in this process; return the summary."""
    run_id = config.run_id or new_run_id()
    t0 = time.perf_counter()
    plan = discover_work(config)
    if on_plan:
        on_plan(plan)
    engine = get_engine(config) if plan.shards else None
    results = []
    for shard in plan.shards:
        results.append(process_shard(shard, config, run_id=run_id, engine=engine, progress=progress))
    return summarize(
        results,
        run_id=run_id,
        config=config,
        seconds=time.perf_counter() - t0,
        total_documents=plan.total_documents,
        already_done=plan.already_done,
    )
