"""Prefect tasks over `pipeline.runner`: discovery, one task per shard, run artifacts, and
`run_flow`, a flow's whole body: the run's lifecycle is `pipeline.runner.Run`, with the Prefect
side of it (`PrefectExecution`: discovery as a task, the summary, report and failure artifacts).

A task is a whole shard (never a page: Prefect costs ~200 ms per task run). Shard tasks
retry with exponential back-off only for transient storage errors (`is_transient`); bad
input never raises (it becomes rows) and a broken configuration fails at once. A flow run that
meets a failure of `pipeline.outcomes`' table ends Failed with its one line (`failed_run`).

Task results stay in memory (`persist_result=False`, no cache): nothing of a run,
storage options included, is written to Prefect's result storage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run as current_flow_run
from prefect.tasks import Task, exponential_backoff

from flows.parameters import ConfigurationError, build_config, public_url
from pipeline import outcomes, runner
from pipeline.config import RunConfig
from pipeline.dataset import Lease
from pipeline.ledger import POLICY
from pipeline.planning import Shard
from pipeline.progress import ProgressMeter, format_bytes, model_size_bytes
from pipeline.report.markdown import md_code, md_text
from pipeline.sources import is_transient as sources_is_transient

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.page_engine import PageEngine

SHARD_RETRIES = POLICY.shard_task_retries  # the ledger's RetryPolicy holds every budget
SHARD_BACKOFF_S = POLICY.shard_backoff_s  # first retry after ~2 s, then ~4 s, ~8 s (with jitter)
SUMMARY_KEY = "docpipe-run-summary"
REPORT_KEY = "docpipe-run-report"
PROGRESS_KEY = "docpipe-progress"

# ---------------------------------------------------------------------------------------
# Which failures are worth a retry
# ---------------------------------------------------------------------------------------


def is_transient(exc: BaseException | None) -> bool:
    """True for storage/network failures that may pass on a retry: `pipeline.sources.is_transient`
    (the project's one classifier), never for a broken configuration."""
    seen: set[int] = set()
    probe = exc
    while probe is not None and id(probe) not in seen:
        seen.add(id(probe))
        if isinstance(probe, ConfigurationError):
            return False
        probe = probe.__cause__
    return sources_is_transient(exc)


def retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect `retry_condition_fn`: retry a failed shard only for a transient error."""
    data = state.data
    if isinstance(data, BaseException):
        return is_transient(data)
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------


@task(name="discover", cache_policy=NO_CACHE, persist_result=False, retries=POLICY.discover_task_retries,
      retry_delay_seconds=POLICY.discover_backoff_s, retry_condition_fn=retry_if_transient)
def discover_task(config: RunConfig, handle: runner.RunHandle) -> runner.WorkPlan:
    """List and hash the source, read what the output already has, plan the rest into shards."""
    plan = runner.discover_work(config, handle)
    get_run_logger().info(
        "discovered %d documents in %.1f s: %d already done, %d to do in %d shards (%d replayed from an "
        "unfinished run)",
        plan.total_documents, plan.discover_s, plan.already_done, plan.to_do, len(plan.shards), plan.replayed,
    )
    return plan


@task(
    name="process-shard",
    task_run_name="shard-{shard.shard_id}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=SHARD_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=SHARD_BACKOFF_S),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
)
def process_shard_task(shard: Shard, config: RunConfig, run_id: str, lease: Lease | None = None) -> runner.ShardResult:
    """Process one shard (idempotent: a shard whose documents file exists is skipped); with a
    lease, nothing is committed once another run owns the output."""
    logger = get_run_logger()
    run_progress = live(run_id)
    shard_log = _ShardLog(shard) if run_progress is None else None
    meter = run_progress.meter if run_progress is not None else shard_log.meter  # type: ignore[union-attr]
    on_event = run_progress.on_event if run_progress is not None else shard_log.on_event  # type: ignore[union-attr]
    engine = load_model(config, on_event)
    if engine is not None and not meter.attached:
        meter.attach(engine.stats)  # tokens/s and busy share move between batches
    result = runner.process_shard(
        shard, config, run_id=run_id, engine=engine, progress=on_event,
        dataset=lease.dataset if lease is not None else None, lease=lease,
    )
    if result.skipped:
        logger.info("shard %s already done: skipped", shard.shard_id)
    else:
        logger.info(
            "shard %s: %d documents, %d pages (%d failed) in %.1f s",
            shard.shard_id, result.documents, result.pages, result.pages_failed, result.seconds,
        )
    return result


def load_model(config: RunConfig, on_event: runner.ProgressFn) -> PageEngine | None:
    """The run's engine (loaded once per process), with a "loading model" log line and its time."""
    if config.model is None:
        return None
    if runner.engine_loaded(config):
        return runner.get_engine(config)
    logger = get_run_logger()
    logger.info("loading model %s (%s) ...", config.model, format_bytes(model_size_bytes(config.model)))
    on_event("model_loading", 0)
    t0 = time.perf_counter()
    engine = runner.get_engine(config)
    seconds = time.perf_counter() - t0
    on_event("model_loaded", int(seconds * 1000))
    logger.info("model loaded in %.1f s", seconds)
    return engine


class _ShardLog:
    """Progress of a shard run without its run's meter in this process (a fan-out child):
    log lines at a sane rate, the child run's own progress artifact."""

    def __init__(self, shard: Shard) -> None:
        self.meter = ProgressMeter()
        self.meter.set_total(len(shard.refs), [shard.shard_id])
        self.shard_id = shard.shard_id
        self._last_log = time.monotonic()
        self._last = 0.0
        self.artifact_id: UUID | None = None

    def on_event(self, event: str, count: int) -> None:
        self.meter.on_event(event, count)
        now = time.monotonic()
        if now - self._last_log >= Progress.LOG_EVERY_S:
            self._last_log = now
            get_run_logger().info("progress: %s", self.meter.snapshot().describe())
        if event in ("shard", "document") or now - self._last >= Progress.ARTIFACT_EVERY_S:
            self._last = now
            snap = self.meter.snapshot()
            text = f"shard {md_code(self.shard_id)}: {md_text(snap.describe())}"
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=snap.percent, description=text)
            else:
                update_progress_artifact(self.artifact_id, snap.percent, description=text)


# ---------------------------------------------------------------------------------------
# Results and artifacts
# ---------------------------------------------------------------------------------------


def result_from_dict(data: dict[str, Any]) -> runner.ShardResult:
    """Rebuild a ShardResult from `to_dict()` output (unknown keys ignored)."""
    known = {f.name for f in dataclasses.fields(runner.ShardResult)}
    return runner.ShardResult(**{k: v for k, v in data.items() if k in known})


def summary_rows(summary: runner.RunSummary, *, failed_shards: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The run's table artifact: counts, errors by type, pages/s, model, output (no credentials)."""
    rows = []
    for row in summary.as_table_rows():
        if row.get("metric") == "output":
            row = {**row, "value": public_url(str(row["value"]))}
        rows.append(row)
    rows.append({"metric": "run id", "value": summary.run_id})
    if failed_shards:
        rows.append({"metric": "shards failed (rerun to resume)", "value": len(failed_shards)})
    return rows


def publish_summary(summary: runner.RunSummary, *, failed_shards: Sequence[str] = ()) -> UUID:
    """Create the table artifact describing the run."""
    state = "finished" if not failed_shards else f"finished with {len(failed_shards)} failed shard(s)"
    description = (
        f"docpipe run {md_code(summary.run_id)} {state}: {summary.documents} documents, {summary.pages} pages "
        f"({summary.pages_failed} failed) in {summary.seconds:.1f} s -> {md_code(public_url(summary.output))}"
    )
    return create_table_artifact(summary_rows(summary, failed_shards=failed_shards), key=SUMMARY_KEY,
                                 description=description)


REPORT_TIMEOUT_S = 120.0  # the report step's thumbnails at most (each one at most 10 s), after the run's own end


def publish_report(config: RunConfig, run_id: str) -> UUID:
    """Write the run's HTML report into the output (`_docpipe/reports/<run>.html`) and say
    where it is in a markdown artifact (a report that fails is a line there, not a failed run).
    Bounded: thumbnails stop after REPORT_TIMEOUT_S, each after at most 10 s in a worker that
    is killed, and only from the bytes the run read (pipeline/report/thumbnails.py)."""
    from pipeline.report import publish_markdown

    note = publish_markdown(config.output, run_id, config.storage_options, shown_output=public_url(config.output),
                            timeout_s=REPORT_TIMEOUT_S)
    return create_markdown_artifact(note, key=REPORT_KEY, description=f"docpipe run {run_id}: visual report")


class Progress:
    """The run's progress in Prefect: a progress artifact and log lines, from one ProgressMeter.

    The artifact's value is the share of pages done (documents before pages can be
    estimated) and its description the meter's line (current shard, pages, pages/s,
    tokens/s, model busy share, ETA). It is updated as shards finish and, while a shard
    works in this process, at most every ARTIFACT_EVERY_S seconds; a log line is written at
    each shard's end and at most every LOG_EVERY_S seconds between (a sane rate for a run
    of 100k pages). Shard tasks of this process find it by run id (`live`).
    """

    ARTIFACT_EVERY_S = 5.0
    LOG_EVERY_S = 30.0

    def __init__(self, total_shards: int, run_id: str, plan: runner.WorkPlan | None = None) -> None:
        self.total = total_shards
        self.done = 0
        self.run_id = run_id
        self.meter = ProgressMeter()
        if plan is not None:
            self.meter.on_plan(plan)
        self._last = 0.0
        self._last_log = time.monotonic()
        self.artifact_id = create_progress_artifact(
            progress=0.0 if total_shards else 100.0, key=PROGRESS_KEY, description=self._text()
        )
        _LIVE[run_id] = self

    def _text(self) -> str:
        head = f"run {md_code(self.run_id)}: {self.done} of {self.total} shards finished"
        if self.meter.shard_index or self.meter.model_loading:
            return f"{head}; {md_text(self.meter.snapshot().describe())}"
        return head

    def on_event(self, event: str, count: int) -> None:
        """A runner progress event of a shard working in this process."""
        self.meter.on_event(event, count)
        now = time.monotonic()
        if now - self._last >= self.ARTIFACT_EVERY_S:
            self._update(now)
        if now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            get_run_logger().info("progress: %s", self.meter.snapshot().describe())

    def _update(self, now: float) -> None:
        self._last = now
        update_progress_artifact(self.artifact_id, self.percent, description=self._text())

    def advance(self, count: int = 1, *, force: bool = False) -> None:
        """Count finished shards; the artifact is updated at most once a second (and at the end)."""
        self.done = min(self.total, self.done + count)
        now = time.monotonic()
        if force or self.done == self.total or now - self._last >= 1.0:
            self._update(now)
        if self.done == self.total:
            _LIVE.pop(self.run_id, None)

    @property
    def percent(self) -> float:
        if not self.total:
            return 100.0
        by_shards = 100.0 * self.done / self.total
        if self.done == self.total:
            return 100.0
        return round(max(by_shards, min(self.meter.snapshot().percent, 99.99)), 2)


_LIVE: dict[str, Progress] = {}


def live(run_id: str) -> Progress | None:
    """The progress of run `run_id` when its flow runs in this process (ingest), else None."""
    return _LIVE.get(run_id)


FAILURE_KEY = "docpipe-run-failure"


def report_failure(run_id: str, reason: str) -> None:
    """Say why the run failed where people look: an ERROR log line (shown by `prefect
    deployment run --watch` and the UI's logs) and a markdown artifact of the flow run."""
    get_run_logger().error("docpipe run %s failed: %s", run_id, reason)
    try:
        create_markdown_artifact(
            f"## docpipe run {md_code(run_id)} failed\n\n{md_text(reason)}\n",
            key=FAILURE_KEY,
            description=f"docpipe run {run_id}: why it failed",
        )
    except Exception as exc:  # noqa: BLE001 - the log line above already says it
        get_run_logger().warning("could not write the failure artifact (%s)", exc)


def failed_run(exc: BaseException) -> State:
    """The end of a flow run that met an expected failure: Failed, with the one line as its
    message. Returned rather than raised, so Prefect logs no traceback of our code (it is
    logged at DEBUG: PREFECT_LOGGING_LEVEL=DEBUG shows it, as `docpipe -v` does)."""
    from prefect.states import Failed

    message = outcomes.flow_message(exc)
    get_run_logger().debug("the run failed: %s", message, exc_info=exc)
    return Failed(message=message)


# ---------------------------------------------------------------------------------------
# A flow's run: pipeline.runner.Run, with the Prefect side of it
# ---------------------------------------------------------------------------------------


class PrefectExecution(runner.ShardExecution):
    """What both flows add to a run's lifecycle: discovery as a task (retried on transient storage
    errors), the summary table artifact and a log line, the HTML report, and the reason of a
    failure where people look. The shards' execution is the subclass's (`flows.ingest.InTasks`,
    `flows.fanout.FanOut`)."""

    def discover(self, run: runner.Run) -> runner.WorkPlan:
        return discover_task(run.config, run.handle)

    def summarized(self, run: runner.Run, summary: runner.RunSummary, plan: runner.WorkPlan,
                   failed: Sequence[tuple[str, str]]) -> None:
        publish_summary(summary, failed_shards=[sid for sid, _ in failed])
        get_run_logger().info(
            "run %s: %d documents, %d pages (%d failed) in %.1f s, %.2f pages/s over %d shards",
            run.run_id, summary.documents, summary.pages, summary.pages_failed, summary.seconds, summary.pages_per_s,
            len(plan.shards),
        )

    def ended(self, run: runner.Run, summary: runner.RunSummary) -> None:
        publish_report(run.config, run.run_id)

    def failed(self, run: runner.Run, exc: BaseException) -> None:
        report_failure(run.run_id, outcomes.flow_message(exc))


def resolve_run_id(config: RunConfig) -> str:
    """The configured run id, else this flow run's id, else a fresh one."""
    if config.run_id:
        return config.run_id
    flow_run_id = current_flow_run.get_id()
    return str(flow_run_id) if flow_run_id else runner.new_run_id()


def log_config(config: RunConfig, run_id: str) -> None:
    """Log the settings without secrets (storage options reduced to their keys)."""
    public = config.public_dict()
    public["source"], public["output"] = public_url(config.source), public_url(config.output)
    get_run_logger().info("docpipe run %s settings: %s", run_id, json.dumps(public, default=str, sort_keys=True))


def run_flow(params: Mapping[str, Any], execution: PrefectExecution) -> Any:
    """A flow's whole body: its parameters as a RunConfig, the run (`pipeline.runner.Run`, setup
    checks included) with `execution`, its summary as the flow's result (output URL public). A
    failure of `pipeline.outcomes`' table ends the flow run Failed in one line, without a traceback;
    anything else is a bug of ours and keeps its traceback."""
    try:
        config = build_config(params)
        run_id = resolve_run_id(config)
        log_config(config, run_id)
        summary = runner.Run(config, preflight=True, run_id=run_id).execute(execution)
    except outcomes.flow_failures() as exc:
        return failed_run(exc)
    data = summary.to_dict()
    data["output"] = public_url(summary.output)
    return data
