"""Process shards end to end: prepare pages (CPU), answer them (model), write Parquet.

The same functions serve `docpipe run` (all shards in this process) and the Prefect
flows (one task or child flow run per shard). The model is loaded once per process
(`get_engine`) and reused across shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import RunConfig
from pipeline.dataset import DOCUMENTS, Dataset, Lease, PlanRecord
from pipeline.planning import Shard, ShardPlan, plan_shards
from pipeline.prepare import DocumentDone, DocumentRetry, PageWork, PrepSettings, iter_shard_documents
from pipeline.records import DocStatus, DocumentOutcome, DocumentRef, PageAnswers, Stage, StageError
from pipeline.shard.ledger import POLICY, DocFacts, decide, retry_in_run

log = logging.getLogger("docpipe")

# (event, count). Events, in the order a run emits them: "model_loading" (0), "model_loaded"
# (milliseconds it took), then per shard "shard" (its documents), "prepared" (a page ready for
# the model), "prepared_document" (a document's pages all prepared), "model_start" (a batch of
# N pages handed to the model), "model_ms" and "tokens" (that batch's model time and generated
# tokens), "page" (a page's row recorded: answered, or not for the model), "document" (a
# document's row). pipeline.progress.ProgressMeter turns them into pages/s, tokens/s, busy
# share and ETA.
ProgressFn = Callable[[str, int], None]

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
# Owning the output for a run
# ---------------------------------------------------------------------------------------


class SettingsChanged(ValueError):
    """The output holds rows written with other output settings and the run did not ask to reprocess."""


class DeviceFailure(RuntimeError):
    """The model failed on every page of consecutive batches: the device (or model) is broken."""


@dataclass
class RunHandle:
    """A run that owns its output: the dataset, the lease, and when it started."""

    config: RunConfig
    run_id: str
    dataset: Dataset
    lease: Lease
    started_at: datetime
    t0: float = field(default_factory=time.perf_counter)
    model_revision: str | None = None


def begin_run(config: RunConfig, run_id: str | None = None) -> RunHandle:
    """Take the output's lease, check the settings against what it holds, record the run.

    Raises OutputBusy (another live run owns it), SettingsChanged, OutputNotWritable.
    """
    run_id = run_id or config.run_id or new_run_id()
    dataset = Dataset(config.output, config.storage_options)
    lease = dataset.acquire(run_id, wait_s=config.wait_for_output_s).start_heartbeat()
    handle = RunHandle(config=config, run_id=run_id, dataset=dataset, lease=lease, started_at=datetime.now(timezone.utc))
    try:
        dataset.repair(lease)  # what the run resumes from: checked, damaged files quarantined, one warning
        check_settings(dataset, config, run_id)
        handle.model_revision = model_revision(config)
        dataset.write_run(run_row(handle, "running"))
        dataset.clean(current_fingerprint=config.fingerprint(), generation=lease.generation)
    except BaseException:
        lease.release()
        raise
    return handle


def end_run(handle: RunHandle, status: str, summary: "RunSummary | None" = None, message: str | None = None) -> None:
    """Record how the run ended and give the output up."""
    try:
        handle.dataset.write_run(run_row(handle, status, summary, message))
    except Exception as exc:  # noqa: BLE001 - the rows are committed; the record is best effort
        log.warning("could not record the end of run %s (%s)", handle.run_id, exc)
    finally:
        handle.lease.release()


def check_settings(dataset: Dataset, config: RunConfig, run_id: str) -> None:
    """SettingsChanged when the output was last written with other output settings."""
    if config.reprocess:
        return
    fingerprint = config.fingerprint()
    runs = [r for r in dataset.read_runs() if r["run_id"] != run_id]
    if runs:
        last = runs[-1]
        if last["config_fingerprint"] == fingerprint:
            return
        before = json.loads(last["output_settings"] or "{}")
        now = config.output_settings()
        names = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise SettingsChanged(
            f"the output was written by run {last['run_id']} with other settings ({', '.join(names) or 'fingerprint'}"
            f" differ); use the same settings to resume, or --reprocess to redo its documents with the new ones"
        )
    fingerprints = dataset.read_state().fingerprints
    if fingerprints and fingerprint not in fingerprints:
        raise SettingsChanged(
            "the output holds rows written with other settings (config_fingerprint "
            f"{', '.join(sorted(fingerprints))}, now {fingerprint}); use the same settings to resume, or "
            "--reprocess to redo its documents with the new ones"
        )


def model_revision(config: RunConfig) -> str | None:
    """The model's revision as recorded for the run: a hub commit or a local folder's content hash."""
    if config.model is None:
        return None
    from pipeline.inference.loading import content_revision

    return content_revision(config.model, config.revision)


def _versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "docpipe_version": version("docpipe") or "unknown",
        "transformers_version": version("transformers"),
        "torch_version": version("torch"),
        "python_version": platform.python_version(),
    }


def _generation(config: RunConfig) -> dict[str, Any] | None:
    """The run's effective decoding settings (None without a model, or when its family is not known)."""
    if config.model is None:
        return None
    from pipeline.inference.loading import ModelConfigError, generation_settings
    from pipeline.inference.registry import UnsupportedModelError

    try:
        settings = generation_settings(config)
    except (ModelConfigError, UnsupportedModelError):
        return None
    return None if settings is None else settings.as_dict()


def run_row(handle: RunHandle, status: str, summary: "RunSummary | None" = None, message: str | None = None) -> dict[str, Any]:
    """The run's row of the runs table."""
    from pipeline.sources import public_url

    config = handle.config
    public = config.public_dict()
    public["source"], public["output"] = public_url(config.source), public_url(config.output)
    public["generation"] = _generation(config)  # the effective decoding: the family's default + overrides
    ended = None if status == "running" else datetime.now(timezone.utc)
    counts = None
    if summary is not None:
        counts = json.dumps(
            {"documents_by_status": summary.documents_by_status, "errors_by_type": summary.errors_by_type},
            sort_keys=True,
        )
    return {
        "run_id": handle.run_id,
        "status": status,
        "started_at": handle.started_at,
        "ended_at": ended,
        "source": public_url(config.source),
        "config_fingerprint": config.fingerprint(),
        "output_settings": json.dumps(config.output_settings(), sort_keys=True),
        "settings": json.dumps(public, sort_keys=True, default=str),
        "reprocess": config.reprocess,
        "model_id": config.model,
        "model_revision": handle.model_revision,
        **_versions(),
        "host": socket.gethostname(),
        "documents_discovered": summary.total_documents if summary else None,
        "documents_processed": summary.documents if summary else None,
        "pages": summary.pages if summary else None,
        "pages_failed": summary.pages_failed if summary else None,
        "counts": counts,
        "message": message,
    }


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
    replayed: int = 0  # shards of an earlier, unfinished run replayed under their own ids

    @property
    def to_do(self) -> int:
        return sum(len(s.refs) for s in self.shards)


def discover_work(config: RunConfig, handle: RunHandle) -> WorkPlan:
    """List and hash the source, read what the output holds, cut the rest into shards, and
    write every shard's plan before any of its files (call while owning the output)."""
    from pipeline import sources

    t0 = time.perf_counter()
    dataset = handle.dataset
    fingerprint = config.fingerprint()
    state = dataset.read_state(fingerprint=fingerprint, reprocess=config.reprocess)
    committed = set(dataset.part_files(DOCUMENTS))
    pending = [p for p in dataset.plans().values() if p.fingerprint == fingerprint and p.shard_id not in committed]
    refs = sources.discover(
        config.source,
        extensions=config.extensions,
        storage_options=config.storage_options,
        limit=config.limit,
        known=state.known,  # unchanged files already recorded are not read again
    )
    from pipeline.dataset import fault_point

    fault_point("after_discover")
    # A file whose bytes differ from the version the output holds replaces it (latest wins).
    refs = [dataclasses.replace(r, replaces=state.versions[r.uri])
            if r.doc_id and state.versions.get(r.uri) not in (None, r.doc_id) else r for r in refs]
    replay = _replayable(pending, refs, state.doc_keys, dataset)
    in_plans = {(r.uri, r.doc_id) for shard in replay for r in shard.refs}
    plan: ShardPlan = plan_shards(
        refs,
        done_keys=state.doc_keys | in_plans,
        processed_elsewhere=state.processed,
        shard_size=config.shard_size,
        fingerprint=fingerprint,
        retry=state.retry,
    )
    for shard in plan.shards:
        handle.lease.ensure()
        dataset.write_plan(
            PlanRecord(
                shard_id=shard.shard_id,
                run_id=handle.run_id,
                fingerprint=fingerprint,
                shard=shard.to_dict(),
                created_at=time.time(),
                attempts=dict(shard.attempts),
            )
        )
    if replay:
        log.info("replaying %d unfinished shards of an earlier run", len(replay))
    listed = {(r.uri, r.doc_id) for r in refs}
    return WorkPlan(
        refs=tuple(refs),
        shards=tuple(replay) + plan.shards,
        total_documents=len(refs),
        already_done=plan.already_done - len(in_plans & listed),
        discover_s=time.perf_counter() - t0,
        replayed=len(replay),
    )


def _replayable(pending: list[PlanRecord], refs: list[DocumentRef], done: frozenset[tuple[str, str]],
                dataset: Dataset) -> list[Shard]:
    """Unfinished plans that may be replayed as they are: each of their documents still listed
    with the same bytes, not done, and in no other plan kept. Any other plan (a late plan of
    a run that lost the output, a file changed or gone since) is dropped and its documents
    planned afresh, so a document is never in two shards."""
    listed = {(r.uri, r.doc_id) for r in refs}
    claimed: set[tuple[str, str]] = set()
    out = []
    for plan in sorted(pending, key=lambda p: (p.created_at, p.shard_id)):
        shard = Shard.from_dict(plan.shard)
        keys = [(r.uri, r.doc_id) for r in shard.refs]
        if all(k in listed and k not in done and k not in claimed for k in keys):
            claimed.update(keys)
            out.append(shard)
            continue
        dataset.delete_plan(plan.shard_id)
        log.info("dropped the plan of shard %s: some of its documents are done, changed or in another plan; "
                 "the rest are planned again", plan.shard_id)
    return sorted(out, key=lambda s: s.shard_id)


# ---------------------------------------------------------------------------------------
# Engine cache: one model per process
# ---------------------------------------------------------------------------------------

_ENGINES: dict[tuple[Any, ...], Any] = {}


def _engine_key(config: RunConfig) -> tuple[Any, ...]:
    """The settings that change what a loaded engine does (declared once: config.FIELD_TABLE's "engine" role).
    A field not declared there counts (at worst the model is reloaded once too often)."""
    from pipeline.config import ENGINE_FIELDS, FIELD_STAGE

    return (config.model_dump_json(exclude=set(FIELD_STAGE) - ENGINE_FIELDS),)


def get_engine(config: RunConfig) -> Any | None:
    """The inference engine for this configuration, loaded once per process (None without a model)."""
    if config.model is None:
        return None
    key = _engine_key(config)
    engine = _ENGINES.get(key)
    if engine is None:
        from pipeline.inference import load_engine
        from pipeline.inference.vllm_engine import engine_for, load_vllm_engine

        _ENGINES.clear()  # one model in memory at a time
        name = engine_for(config)
        log.info("loading model %s (%s engine)", config.model, name)
        engine = load_vllm_engine(config) if name == "vllm" else load_engine(config)
        _ENGINES[key] = engine
    return engine


def engine_loaded(config: RunConfig) -> bool:
    """Whether `get_engine(config)` would return without loading anything."""
    return config.model is None or _engine_key(config) in _ENGINES


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
    attempt: int = 1  # the pool's attempt whose pages count
    outcome: DocumentOutcome | None = None  # set when preparation of the document has ended
    pending: int = 0  # pages waiting for the model
    rows: list[dict[str, Any]] = field(default_factory=list)  # page rows of the current attempt
    errors: list[StageError] = field(default_factory=list)  # page errors of the current attempt
    failed_in_model: int = 0
    model_s: float = 0.0


# Every retry budget is in pipeline.shard.ledger.RetryPolicy (POLICY); this is the model's.
DEVICE_FAILURE_WINDOWS = POLICY.device_failure_windows  # consecutive batches failing on every page stop the shard


class _ShardRun:
    """State of one shard in progress: rows collected, documents waiting for their pages.

    One place decides a document's status: `_final_outcome`, once its pages are answered.
    """

    def __init__(
        self, shard: Shard, config: RunConfig, run_id: str, engine: Any | None, progress: ProgressFn | None
    ) -> None:
        self.shard, self.config, self.run_id = shard, config, run_id
        self.engine, self.progress = engine, progress
        self.fingerprint = config.fingerprint()
        self.states: dict[str, _DocState] = {ref.uri: _DocState() for ref in shard.refs}
        self.window: list[PageWork] = []
        self.window_tokens = 0
        self.model_seconds = 0.0
        self.failed_windows = 0

    # ---- events --------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
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
        self.window = [w for w in self.window if w.ref_uri != uri]
        self.window_tokens = sum(w.plan.visual_tokens for w in self.window if w.plan)
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
        # The one grouping rule (pipeline.inference.batching): the engine's. A page that
        # does not fit closes the group before it; a group nothing more can join goes at once.
        rule = self._batch_rule()
        cost = work.plan.visual_tokens if work.plan else 0
        if not rule.fits(len(self.window), self.window_tokens, cost):
            self.answer_window()
        self.window.append(work)
        self.window_tokens += cost
        if rule.full(len(self.window), self.window_tokens):
            self.answer_window()

    def _batch_rule(self) -> Any:
        from pipeline.inference.batching import BatchRule

        rule = getattr(self.engine, "batch_rule", None)
        return rule if isinstance(rule, BatchRule) else BatchRule(self.config.batch_visual_tokens, self.config.max_batch_pages)

    def answer_window(self) -> None:
        """Hand the held group of pages to the engine, which answers it as one group."""
        window, self.window, self.window_tokens = self.window, [], 0
        if not window:
            return
        t0 = time.perf_counter()
        if self.progress:
            self.progress("model_start", len(window))
        try:
            answers = self.engine.answer([w.prepared for w in window])
        except Exception as exc:  # the engine handles page errors itself; last line of defence
            err = StageError(Stage.INFERENCE, "engine_failure", f"{type(exc).__name__}: {exc}", retryable=True)
            answers = [self._failed_answer(err) for _ in window]
        self.model_seconds += time.perf_counter() - t0
        if self.progress:
            self.progress("model_ms", int(1000 * (time.perf_counter() - t0)))
            self.progress("tokens", sum(a.generated_tokens for a in answers))
        failed = [a.error for a in answers if a.error is not None]
        if len(failed) == len(answers) and all(e.retryable for e in failed):
            self.failed_windows += 1
            if self.failed_windows >= DEVICE_FAILURE_WINDOWS:
                raise DeviceFailure(
                    f"the model failed on every page of {self.failed_windows} consecutive batches "
                    f"({failed[0].type}: {failed[0].message}); stopping (nothing of shard {self.shard.shard_id} "
                    "was committed; a rerun resumes)"
                )
        else:
            self.failed_windows = 0
        for work, ans in zip(window, answers, strict=True):
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
        outcome = state.outcome
        attempt = self.shard.attempt_of(uri)
        if outcome is None:
            return DocFacts(attempt=attempt, reported=False)
        return DocFacts(attempt=attempt, duplicate=outcome.status is DocStatus.DUPLICATE, error=outcome.error,
                        pages_ok=outcome.pages_ok, pages_failed=outcome.pages_failed,
                        model_failed=state.failed_in_model,
                        page_errors=tuple(state.errors), damaged=outcome.open_note is not None,
                        pages_blank=sum(row.get("page_kind") == "blank" for row in state.rows))

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ShardResult]:
        """Final rows of the shard: (pages, documents) and its counts."""
        self.answer_window()
        outcomes: dict[str, DocumentOutcome] = {}
        pages: list[dict[str, Any]] = []
        # originals first: a copy whose original failed takes that failure (a fact for the ledger)
        for ref in sorted(self.shard.refs, key=lambda r: r.duplicate_of is not None):
            original = outcomes.get(ref.duplicate_of or "")
            failed = None
            if original is not None and original.status is DocStatus.ERROR and original.error is not None:
                failed = dataclasses.replace(original.error,
                                             message=f"same bytes as {original.ref.uri}: {original.error.message}")
            outcome, rows = self._final_outcome(ref, self.states[ref.uri], original_failed=failed)
            outcomes[ref.uri] = outcome
            pages.extend(rows)
        docs = [self._document_row(outcomes[r.uri]) for r in self.shard.refs]
        pages.sort(key=lambda row: (row["source_uri"], row["page_number"]))
        docs.sort(key=lambda row: row["source_uri"])
        return pages, docs, self._counts(pages, docs)

    # ---- helpers -------------------------------------------------------------------
    def _final_outcome(self, ref: DocumentRef, state: _DocState, *, original_failed: StageError | None = None
                       ) -> tuple[DocumentOutcome, list[dict[str, Any]]]:
        """The document's row as the ledger decides it (`pipeline.shard.ledger.decide`), with
        the page rows that stand."""
        facts = dataclasses.replace(self._facts(ref.uri, state), original_failed=original_failed)
        verdict = decide(facts, POLICY)
        outcome = state.outcome or DocumentOutcome(ref=ref, status=verdict.status)
        outcome.attempt = self.shard.attempt_of(ref.uri)
        outcome.timings.inference_s += state.model_s
        outcome.timings.total_s += state.model_s  # preparation wall time + its share of the model
        outcome.status, outcome.error = verdict.status, verdict.error
        outcome.pages_ok, outcome.pages_failed = verdict.pages_ok, verdict.pages_failed
        if not verdict.keep_pages:
            return outcome, []
        return outcome, [{**r, "error_retryable": False if r["error_retryable"] else r["error_retryable"]}
                         for r in state.rows]

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

    def _document_row(self, outcome: DocumentOutcome) -> dict[str, Any]:
        from pipeline import sink

        if self.progress:
            self.progress("document", 1)
        return sink.document_row(
            outcome,
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
    engine: Any | None = None,
    progress: ProgressFn | None = None,
    dataset: Dataset | None = None,
    lease: Lease | None = None,
) -> ShardResult:
    """Process one shard and commit its two Parquet files (idempotent: done shards are skipped).

    Documents with a retryable failure are tried again within the shard (with back-off)
    before their rows are decided. With a `lease`, nothing is committed once the output
    belongs to another run (LeaseLost). Raises only for a broken configuration, a broken
    device (DeviceFailure) or a storage failure writing the output; bad documents and
    pages become rows.
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
        engine = get_engine(config)
    settings = PrepSettings(config=config, builder=engine.builder if engine is not None else None)
    state = _ShardRun(shard, config, run_id, engine, progress)
    refs = list(shard.refs)
    for round_ in range(POLICY.rounds):
        for event in iter_shard_documents(refs, settings):
            state.on_event(event)
        state.answer_window()
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
                  if d.get("replaces_doc_id") and d["replaces_doc_id"] != d["doc_id"] and not d["error_retryable"]],
    )
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
    """Own the output, discover, plan and process every shard in this process; return the summary.

    The run is recorded in the output's runs table (running, then completed, failed or
    interrupted); whatever happens, the output's lease is given up at the end.
    """
    from pipeline.prepare import _MAIN_GUARD_HINT, PrepWorkersFailing, in_worker_bootstrap

    if in_worker_bootstrap():  # a script without a main guard, re-imported in a prep worker
        raise PrepWorkersFailing("docpipe.run was called while a prep worker was starting; " + _MAIN_GUARD_HINT)
    handle = begin_run(config)
    summary: RunSummary | None = None
    try:
        plan = discover_work(config, handle)
        if on_plan:
            on_plan(plan)
        engine = None
        if plan.shards and config.model is not None:
            if progress:
                progress("model_loading", 0)
            t_load = time.perf_counter()
            engine = get_engine(config)
            if progress:
                progress("model_loaded", int(1000 * (time.perf_counter() - t_load)))
        results = []
        for shard in plan.shards:
            results.append(
                process_shard(
                    shard, config, run_id=handle.run_id, engine=engine, progress=progress,
                    dataset=handle.dataset, lease=handle.lease,
                )
            )
        summary = summarize(
            results,
            run_id=handle.run_id,
            config=config,
            seconds=time.perf_counter() - handle.t0,
            total_documents=plan.total_documents,
            already_done=plan.already_done,
        )
    except KeyboardInterrupt:
        end_run(handle, "interrupted", summary, "interrupted by the user")
        raise
    except BaseException as exc:
        end_run(handle, "failed", summary, f"{type(exc).__name__}: {exc}")
        raise
    end_run(handle, "completed", summary)
    return summary
