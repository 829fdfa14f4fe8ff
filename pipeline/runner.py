"""Process shards end to end: prepare pages (CPU), answer them (model), write Parquet.

The same functions serve `docpipe run` (all shards in this process) and the Prefect
flows (one task or child flow run per shard). The model is loaded once per process
(`get_engine`) and reused across shards. One shard's machinery (pages to the model, the
ledger's verdicts, the commit) is `pipeline.shard.run`; its names are re-exported here.
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
from pipeline.records import DocumentRef
from pipeline.shard import run as shard_run
from pipeline.shard.run import Counts, DeviceFailure, ProgressFn, ShardResult

log = logging.getLogger("docpipe")

__all__ = [
    "Counts",
    "DeviceFailure",
    "ProgressFn",
    "Shard",
    "ShardResult",
    "WorkPlan",
    "RunSummary",
    "OutputIncomplete",
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


class OutputIncomplete(RuntimeError):
    """Shards this run committed are not whole in the output (checked at its end): it did not succeed."""


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

    Raises SetupError (an invalid run id, before anything is written), OutputBusy (another live
    run owns it), SettingsChanged, OutputNotWritable.
    """
    run_id = run_id or config.run_id or new_run_id()
    from pipeline.config import RUN_ID_RE
    from pipeline.preflight import SetupError

    if not RUN_ID_RE.fullmatch(run_id):  # before the output is touched (config.run_id is checked earlier)
        raise SetupError(f"invalid run id {run_id!r}: 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    dataset = Dataset(config.output, config.storage_options)
    lease = dataset.acquire(run_id, wait_s=config.wait_for_output_s).start_heartbeat()
    handle = RunHandle(config=config, run_id=run_id, dataset=dataset, lease=lease, started_at=datetime.now(timezone.utc))
    recorded = False
    try:
        dataset.repair(lease)  # what the run resumes from: checked, damaged files quarantined, one warning
        check_settings(dataset, config, run_id)
        handle.model_revision = model_revision(config)
        dataset.write_run(run_row(handle, "running"))
        recorded = True
        dataset.clean(current_fingerprint=config.fingerprint(), generation=lease.generation)
    except BaseException as exc:
        if recorded:  # the row says how it ended, and the lease is given up
            end_run(handle, ended_status(exc), None, describe_end(exc))
        else:
            lease.release()
        raise
    return handle


def ended_status(exc: BaseException) -> str:
    """The runs row's status for a run that ended with `exc`: `interrupted` for Ctrl-C, SIGTERM,
    SIGHUP (`pipeline.cli` raises a KeyboardInterrupt for them) and Prefect's termination
    signal (a cancelled flow run); `failed` for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "interrupted" if any(c.__name__ == "TerminationSignal" for c in type(exc).__mro__) else "failed"


def describe_end(exc: BaseException) -> str:
    """The runs row's message for a run that ended with `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted by the user"
    if ended_status(exc) == "interrupted":
        signum = getattr(exc, "signal", None)
        return f"terminated by signal {signum}" if signum else "terminated"
    return f"{type(exc).__name__}: {exc}"


def check_commits(handle: RunHandle, results: Iterable[ShardResult]) -> None:
    """OutputIncomplete (one line) unless every shard this run committed is whole in the output
    (documents file, this run's commit, pages file with its rows: footers only)."""
    written = [r.shard_id for r in results if not r.skipped]
    missing = handle.dataset.check_commits(written)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OutputIncomplete(f"{len(missing)} of the {len(written)} shards this run committed are not whole in the "
                               f"output: {missing[0]}{more}; run the same command again to redo them")


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
            {"documents_by_status": summary.documents_by_status, "errors_by_type": summary.errors_by_type,
             "files_skipped": summary.files_skipped},
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
        "files_skipped": sum(summary.files_skipped.values()) if summary else None,
        "counts": counts,
        "message": message,
        "lease_generation": handle.lease.generation,
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
    skipped: dict[str, int] = field(default_factory=dict)  # files under the source with no row, by reason

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
    state = dataset.read_state(fingerprint=fingerprint, reprocess=config.reprocess,
                               retry_timeouts=config.retry_timeouts)
    committed = set(dataset.part_files(DOCUMENTS))
    pending = [p for p in dataset.plans().values() if p.fingerprint == fingerprint and p.shard_id not in committed]
    listing = sources.survey(
        config.source,
        extensions=config.extensions,
        storage_options=config.storage_options,
        limit=config.limit,
        known=state.known,  # unchanged files already recorded are not read again
    )
    refs = listing.refs
    from pipeline.dataset import fault_point

    fault_point("after_discover")
    # A file whose bytes differ from the version the output holds replaces it (latest wins); so
    # does a file that can no longer be read (a dangling link, gone after listing: no id), and
    # a readable file replaces its own `unreadable` row (id ""). One row per file.
    refs = [dataclasses.replace(r, replaces=state.versions[r.uri])
            if state.versions.get(r.uri) not in (None, r.doc_id) else r for r in refs]
    _one_row_per_file(dataset, refs, state)
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
        skipped=listing.skipped,
    )


def _one_row_per_file(dataset: Dataset, refs: list[DocumentRef], state: Any) -> None:
    """A file listed now whose current version (its id, "" when it cannot be read) is done
    keeps that row alone: rows of its other versions still in the output are dropped (a
    transient `unreadable` row after the file read fine again; a second row an older
    docpipe left beside a file that turned into a dangling link). Deleted files are not
    listed and keep their rows."""
    stale = {(r.uri, other) for r in refs if (r.uri, r.doc_id) in state.doc_keys
             for other in state.ids.get(r.uri, ()) if other != r.doc_id}
    if stale:
        removed = dataset.drop_versions(stale)
        log.info("dropped %d rows of files' other versions (each file keeps its current row)", removed)


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
_ENGINE_CHOICES: dict[tuple[Any, ...], str] = {}  # engine key -> "vllm (auto: ...)", for the run summary


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
        from pipeline.inference.vllm_engine import engine_choice, load_vllm_engine

        _ENGINES.clear()  # one model in memory at a time
        _ENGINE_CHOICES.clear()
        name, why = engine_choice(config)
        log.info("loading model %s (%s engine: %s)", config.model, name, why)
        engine = load_vllm_engine(config) if name == "vllm" else load_engine(config)
        _ENGINES[key] = engine
        _ENGINE_CHOICES[key] = f"{name} ({why})"
    return engine


def engine_choice_of(config: RunConfig) -> str | None:
    """The loaded engine's name and why it was chosen ("vllm (auto: ...)"), None before loading."""
    return _ENGINE_CHOICES.get(_engine_key(config)) if config.model is not None else None


def engine_loaded(config: RunConfig) -> bool:
    """Whether `get_engine(config)` would return without loading anything."""
    return config.model is None or _engine_key(config) in _ENGINES


# ---------------------------------------------------------------------------------------
# One shard (pipeline.shard.run), with this process's engine
# ---------------------------------------------------------------------------------------


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
    """`pipeline.shard.run.process_shard`, loading the model with `get_engine` (once per process)
    when the shard has pages for it and no `engine` was given."""
    return shard_run.process_shard(shard, config, run_id=run_id, engine=engine, progress=progress,
                                   dataset=dataset, lease=lease, load_engine=get_engine)


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
    files_skipped: dict[str, int] = field(default_factory=dict)  # files under the source with no row, by reason
    engine: str | None = None  # "vllm (auto: ...)": the engine that ran and why

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    def as_table_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"metric": "documents discovered", "value": self.total_documents},
            *({"metric": f"files skipped ({reason})", "value": n} for reason, n in sorted(self.files_skipped.items())),
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
            *([{"metric": "engine", "value": self.engine}] if self.engine else []),
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
    files_skipped: dict[str, int] | None = None,
) -> RunSummary:
    summary = RunSummary(
        run_id=run_id,
        output=config.output,
        model=config.model,
        total_documents=total_documents,
        already_done=already_done,
        seconds=seconds,
        files_skipped=dict(files_skipped or {}),
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
            files_skipped=plan.skipped,
        )
        summary.engine = engine_choice_of(config) if engine is not None else None
        check_commits(handle, results)
    except BaseException as exc:
        from pipeline.redaction import one_line

        end_run(handle, ended_status(exc), summary, one_line(describe_end(exc)))
        raise
    end_run(handle, "completed", summary)
    return summary
