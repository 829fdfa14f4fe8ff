"""A whole run, begin to end, and the process-wide engine cache.

`Run` is the one lifecycle of a run, whoever starts it: begin (the setup checks, the output's
lease, the runs row), discover (`pipeline.discovery`), process (the shards, by a `ShardExecution`
strategy: `InProcess` here for `docpipe run` and `run()`, Prefect tasks or fan-out child runs in
flows/), summarize (`RunSummary`) and end (the runs row's status and message, the lease given
up). How each failure ends a run is `pipeline.outcomes`' table. The model is loaded once per
process (`get_engine`) and reused across shards. One shard's machinery (pages to the model, the
ledger's verdicts, the commit) is `pipeline.shard.run`; its names are re-exported here, as are
discovery's and the run-level failures'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig
from pipeline.dataset import Dataset, Lease
from pipeline.discovery import WorkPlan, discover_work
from pipeline.outcomes import OutputIncomplete, RunFailed, SettingsChanged, run_message, run_status
from pipeline.planning import Shard
from pipeline.records import RunStatus
from pipeline.shard import run as shard_run
from pipeline.shard.run import Counts, DeviceFailure, ProgressFn, ShardResult

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.page_engine import PageAnswerer, PageEngine

log = logging.getLogger("docpipe")

__all__ = [
    "Counts",
    "DeviceFailure",
    "InProcess",
    "OutputIncomplete",
    "ProgressFn",
    "Run",
    "RunFailed",
    "RunHandle",
    "RunSummary",
    "SettingsChanged",
    "Shard",
    "ShardExecution",
    "ShardResult",
    "Shards",
    "WorkPlan",
    "begin_run",
    "discover_work",
    "end_run",
    "get_engine",
    "new_run_id",
    "process_shard",
    "run",
    "summarize",
]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------------
# Owning the output for a run
# ---------------------------------------------------------------------------------------


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
        dataset.write_run(run_row(handle, RunStatus.RUNNING))
        recorded = True
        dataset.clean(current_fingerprint=config.fingerprint(), generation=lease.generation)
    except BaseException as exc:
        if recorded:  # the row says how it ended, and the lease is given up
            end_run(handle, run_status(exc), None, run_message(exc))
        else:
            lease.release()
        raise
    return handle


def check_commits(handle: RunHandle, results: Iterable[ShardResult]) -> None:
    """OutputIncomplete (one line) unless every shard this run committed is whole in the output
    (documents file, this run's commit, pages file with its rows: footers only)."""
    written = [r.shard_id for r in results if not r.skipped]
    missing = handle.dataset.check_commits(written)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OutputIncomplete(f"{len(missing)} of the {len(written)} shards this run committed are not whole in the "
                               f"output: {missing[0]}{more}; run the same command again to redo them")


def end_run(handle: RunHandle, status: RunStatus | str, summary: "RunSummary | None" = None,
            message: str | None = None) -> None:
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


def run_row(handle: RunHandle, status: RunStatus | str, summary: "RunSummary | None" = None,
            message: str | None = None) -> dict[str, Any]:
    """The run's row of the runs table (its status written as the enum's string)."""
    from pipeline.sources import public_url

    config = handle.config
    public = config.public_dict()
    public["source"], public["output"] = public_url(config.source), public_url(config.output)
    public["generation"] = _generation(config)  # the effective decoding: the family's default + overrides
    status = RunStatus(status)
    ended = None if status is RunStatus.RUNNING else datetime.now(timezone.utc)
    counts = None
    if summary is not None:
        counts = json.dumps(
            {"documents_by_status": summary.documents_by_status, "errors_by_type": summary.errors_by_type,
             "files_skipped": summary.files_skipped},
            sort_keys=True,
        )
    return {
        "run_id": handle.run_id,
        "status": status.value,
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
# Engine cache: one model per process
# ---------------------------------------------------------------------------------------

_ENGINES: dict[tuple[Any, ...], PageEngine] = {}
_ENGINE_CHOICES: dict[tuple[Any, ...], str] = {}  # engine key -> "vllm (auto: ...)", for the run summary


def _engine_key(config: RunConfig) -> tuple[Any, ...]:
    """The settings that change what a loaded engine does (declared once: config.FIELD_TABLE's "engine" role).
    A field not declared there counts (at worst the model is reloaded once too often)."""
    from pipeline.config import ENGINE_FIELDS, FIELD_STAGE

    return (config.model_dump_json(exclude=set(FIELD_STAGE) - ENGINE_FIELDS),)


def get_engine(config: RunConfig) -> PageEngine | None:
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
    engine: PageAnswerer | None = None,
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


# ---------------------------------------------------------------------------------------
# The run's lifecycle, once: begin, discover, process (a strategy), summarize, end
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Shards:
    """What processing a plan's shards gave: their results, and the shards that failed (id, why)
    where the strategy goes on past a failed shard (the flows); in process, a failure ends the run."""

    results: list[ShardResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class ShardExecution:
    """How a run's shards are executed, and what the run says on the way: the strategy `Run.execute`
    is given. `InProcess` runs them one after another in this process; flows/ runs them as Prefect
    tasks (`flows.ingest.InTasks`) or child flow runs (`flows.fanout.FanOut`) and publishes
    artifacts from the hooks. The hooks do nothing here."""

    def discover(self, run: Run) -> WorkPlan:
        """The run's plan (called while the run owns the output)."""
        return discover_work(run.config, run.handle)

    def process(self, run: Run, plan: WorkPlan) -> Shards:
        raise NotImplementedError

    def summarized(self, run: Run, summary: RunSummary, plan: WorkPlan, failed: Sequence[tuple[str, str]]) -> None:
        """The run got its summary (before its end is decided and recorded)."""

    def ended(self, run: Run, summary: RunSummary) -> None:
        """The runs row says how a run that got its summary ended (completed or failed)."""

    def failed(self, run: Run, exc: BaseException) -> None:
        """The run ended with `exc` (at its begin, or later: its row then says so)."""


@dataclass
class InProcess(ShardExecution):
    """Every shard in this process, in plan order, with one engine loaded before the first; a
    shard that raises ends the run. `progress` gets the runner's events, `on_plan` the plan."""

    progress: ProgressFn | None = None
    on_plan: Callable[[WorkPlan], None] | None = None

    def process(self, run: Run, plan: WorkPlan) -> Shards:
        if self.on_plan:
            self.on_plan(plan)
        config, handle = run.config, run.handle
        engine = None
        if plan.shards and config.model is not None:
            if self.progress:
                self.progress("model_loading", 0)
            t_load = time.perf_counter()
            engine = get_engine(config)
            if self.progress:
                self.progress("model_loaded", int(1000 * (time.perf_counter() - t_load)))
        return Shards([process_shard(shard, config, run_id=run.run_id, engine=engine, progress=self.progress,
                                     dataset=handle.dataset, lease=handle.lease) for shard in plan.shards])


def failure_message(failed: Iterable[tuple[str, str]], total: int) -> str:
    """Why the run failed, naming the shards; a rerun resumes (finished shards are skipped)."""
    failed = list(failed)
    listed = "; ".join(f"{sid}: {msg}" for sid, msg in failed[:5])
    more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
    return (
        f"{len(failed)} of {total} shards failed: {listed}{more}. "
        "Finished shards are kept; run again with the same source and output to resume."
    )


class Run:
    """One run, begin to end: the lifecycle `docpipe run`, `run()` and both flows go through.

    - begin: the setup checks (`pipeline.preflight.check_setup`, once, unless the run was built
      with `preflight=False`: a caller must say so, it cannot forget them), then the output's
      lease, the settings checked against what it holds, the runs row `running` (`begin_run`);
    - discover: the plan (`pipeline.discovery`), by the strategy;
    - process: the shards, by the strategy (`ShardExecution`);
    - summarize: `RunSummary`; shards that failed (`RunFailed`) or are not whole in the output
      (`OutputIncomplete`, `check_commits`) make the run a failure;
    - end: the runs row `completed`, or the status and one line `pipeline.outcomes` gives for
      the failure (`failed`, `interrupted`), and the lease given up, whatever happened.
    """

    def __init__(self, config: RunConfig, *, preflight: bool, run_id: str | None = None) -> None:
        self.config = config
        self.preflight = preflight
        self.run_id = run_id or config.run_id or new_run_id()
        self._handle: RunHandle | None = None
        self._checked = False

    @property
    def handle(self) -> RunHandle:
        """The run's hold on the output (from its begin)."""
        if self._handle is None:
            raise RuntimeError(f"run {self.run_id} has not begun")
        return self._handle

    def check_setup(self) -> None:
        """The setup checks, once (a caller may run them early, e.g. before a progress display)."""
        if self.preflight and not self._checked:
            from pipeline.preflight import check_setup

            check_setup(self.config)
            self._checked = True

    def begin(self) -> RunHandle:
        from pipeline.prepare import _MAIN_GUARD_HINT, PrepWorkersFailing, in_worker_bootstrap

        if in_worker_bootstrap():  # a script without a main guard, re-imported in a prep worker
            raise PrepWorkersFailing("docpipe.run was called while a prep worker was starting; " + _MAIN_GUARD_HINT)
        self.check_setup()
        self._handle = begin_run(self.config, self.run_id)
        return self._handle

    def summarize(self, results: Iterable[ShardResult], plan: WorkPlan) -> RunSummary:
        summary = summarize(results, run_id=self.run_id, config=self.config,
                            seconds=time.perf_counter() - self.handle.t0, total_documents=plan.total_documents,
                            already_done=plan.already_done, files_skipped=plan.skipped)
        if plan.shards and self.config.model is not None:  # a model was loaded: say which engine ran it and why
            summary.engine = engine_choice_of(self.config)
        return summary

    def end(self, summary: RunSummary | None, exc: BaseException | None = None) -> None:
        """Record how the run ended (`completed` without `exc`) and give the output up."""
        if exc is None:
            end_run(self.handle, RunStatus.COMPLETED, summary)
        else:
            end_run(self.handle, run_status(exc), summary, run_message(exc))

    def execute(self, execution: ShardExecution) -> RunSummary:
        """Begin, discover, process, summarize, end; the summary, or the failure raised once the
        runs row says how the run ended."""
        try:
            self.begin()
        except BaseException as exc:
            execution.failed(self, exc)
            raise
        summary: RunSummary | None = None
        try:
            plan = execution.discover(self)
            shards = execution.process(self, plan)
            summary = self.summarize(shards.results, plan)
            execution.summarized(self, summary, plan, shards.failed)
            if shards.failed:
                raise RunFailed(failure_message(shards.failed, len(plan.shards)))
            check_commits(self.handle, shards.results)  # what the shards committed is whole (footers only)
        except BaseException as exc:
            self.end(summary, exc)
            if summary is not None:
                execution.ended(self, summary)
            execution.failed(self, exc)
            raise
        self.end(summary)
        execution.ended(self, summary)
        return summary


def run(config: RunConfig, *, progress: ProgressFn | None = None, on_plan: Callable[[WorkPlan], None] | None = None,
        preflight: bool = False) -> RunSummary:
    """A whole run in this process (`Run` with `InProcess`); return the summary.

    The run is recorded in the output's runs table (running, then completed, failed or
    interrupted); whatever happens, the output's lease is given up at the end. The setup checks
    run with `preflight=True` (`docpipe run` runs them); the library call leaves them to its caller.
    """
    return Run(config, preflight=preflight).execute(InProcess(progress=progress, on_plan=on_plan))
