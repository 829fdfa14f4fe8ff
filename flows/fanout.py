"""Scale-out: a parent flow fans shards out to a deployment of the `docpipe-process-shard` flow.

`docpipe-fanout` discovers the work, then creates one child flow run per shard with
`run_deployment(..., timeout=0)`; every worker polling the child deployment's pool and
queue takes shards as it frees up (start one worker per GPU with `CUDA_VISIBLE_DEVICES`
and `--limit 1`, or one per machine). The parent watches the children, updates a progress
artifact, re-submits a child run that failed or crashed (a killed worker) up to
`max_resubmits` times, and publishes the run's table artifact from the children's result
artifacts. Shards are idempotent, so a re-submitted shard never duplicates rows. The run's
lifecycle is `pipeline.runner.Run` (`tasks.run_flow`); `FanOut` is its shard execution.

Each child flow run is a fresh process on its worker (process work pool), so the model is
loaded once per shard there: use a larger `shard_size` for fan-out runs with a model.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run

from flows import tasks
from flows.parameters import build_config, with_config_parameters
from pipeline import outcomes, runner
from pipeline.config import RunConfig
from pipeline.dataset import Dataset, Lease, LeaseLost
from pipeline.ledger import POLICY
from pipeline.planning import Shard
from pipeline.redaction import one_line
from pipeline.report.markdown import md_code, md_text

PARENT_FLOW_NAME = "docpipe-fanout"
CHILD_FLOW_NAME = "docpipe-process-shard"
DEFAULT_SHARD_DEPLOYMENT = f"{CHILD_FLOW_NAME}/process-shard"
POLL_INTERVAL_S = 2.0

# what the parent does next with a child run (`triage`)
ChildRunAction = Literal["wait", "done", "resubmit", "failed"]

_RETRYABLE_STATES = frozenset({StateType.FAILED, StateType.CRASHED})


def triage(state_type: StateType | None, attempts: int, max_resubmits: int) -> ChildRunAction:
    """What to do with a child run in this state after `attempts` submissions of its shard.

    Completed -> done. Failed or Crashed (e.g. its worker was killed) -> resubmit while
    `attempts <= max_resubmits`, else failed. Cancelled -> failed (someone meant it).
    Anything else (scheduled, pending, running, paused) -> wait.
    """
    if state_type is StateType.COMPLETED:
        return "done"
    if state_type in _RETRYABLE_STATES:
        return "resubmit" if attempts <= max_resubmits else "failed"
    if state_type is StateType.CANCELLED:
        return "failed"
    return "wait"


@dataclass(slots=True)
class ChildRun:
    shard: Shard
    flow_run_id: UUID
    attempts: int = 1


# ---------------------------------------------------------------------------------------
# The child flow: one shard
# ---------------------------------------------------------------------------------------


@flow(name=CHILD_FLOW_NAME, validate_parameters=False, persist_result=False,
      flow_run_name="shard-{shard[shard_id]}")
def process_shard_flow(
    shard: dict[str, Any], config: dict[str, Any], run_id: str, lease_generation: int | None = None
) -> Any:
    """Process one shard of a fanned-out run and publish its result as a table artifact.

    Args:
        shard: The shard, as `Shard.to_dict()` gives it (id and document references).
        config: The run's settings, as `RunConfig.model_dump(mode="json")` gives them.
        run_id: The parent run's id, written into every row.
        lease_generation: The parent's lease on the output; the shard runs under it and
            commits nothing once a newer run owns the output (a child left queued by a
            parent that died is then skipped: the newer parent replays its shard).
    """
    try:
        return _process_shard(shard, config, run_id, lease_generation)
    except outcomes.flow_failures() as exc:  # one line in the run's state, no traceback
        return tasks.failed_run(exc)


def _process_shard(
    shard: dict[str, Any], config: dict[str, Any], run_id: str, lease_generation: int | None
) -> dict[str, Any]:
    cfg = build_config(config)
    work = Shard.from_dict(shard)
    lease: Lease | None = None
    if lease_generation is not None:
        try:
            lease = Lease.join(Dataset(cfg.output, cfg.storage_options), int(lease_generation), run_id)
        except LeaseLost as exc:
            get_run_logger().warning("shard %s not processed: %s", work.shard_id, exc)
            result = runner.ShardResult(shard_id=work.shard_id, skipped=True)
            create_table_artifact([result.to_dict()],
                                  description=f"docpipe shard {md_code(work.shard_id)}: {md_text(one_line(str(exc)))}")
            return result.to_dict()
        lease.start_heartbeat()  # a running shard keeps its parent's lease fresh
    try:
        result = tasks.process_shard_task(work, cfg, run_id, lease)
    finally:
        if lease is not None:
            lease.stop_heartbeat()
    create_table_artifact(
        [result.to_dict()],
        description=f"docpipe shard {md_code(work.shard_id)} of run {md_code(run_id)}"
        + (" (already done: skipped)" if result.skipped else ""),
    )
    return result.to_dict()


# ---------------------------------------------------------------------------------------
# The parent flow
# ---------------------------------------------------------------------------------------


def _submit(shard: Shard, config: RunConfig, run_id: str, deployment: str, attempt: int, generation: int) -> UUID:
    parent = current_flow_run.get_id() or run_id
    child = run_deployment(
        deployment,
        parameters={
            "shard": shard.to_dict(),
            "config": config.model_dump(mode="json"),
            "run_id": run_id,
            "lease_generation": generation,
        },
        timeout=0,
        idempotency_key=f"{parent}:{shard.shard_id}:{attempt}",
        tags=["docpipe"],
    )
    return child.id


def _read_result(client: SyncPrefectClient, child: ChildRun) -> runner.ShardResult:
    """The child's result artifact, or counts from the shard itself when it is missing."""
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[child.flow_run_id]),
            type=ArtifactFilterType(any_=["table"]),
        )
    )
    for artifact in artifacts:
        try:
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            return tasks.result_from_dict(rows[0])
        except (TypeError, ValueError, KeyError, IndexError):
            continue
    get_run_logger().warning(
        "shard %s: child run %s completed without a result artifact; its pages are not in this summary "
        "(they are in the output)", child.shard.shard_id, child.flow_run_id,
    )
    return runner.ShardResult(shard_id=child.shard.shard_id, documents=len(child.shard.refs))


def _state_types(client: SyncPrefectClient, ids: list[UUID]) -> dict[UUID, StateType | None]:
    out: dict[UUID, StateType | None] = {}
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk))
        out.update({r.id: (r.state.type if r.state else None) for r in runs})
    return out


def fan_out(
    config: RunConfig, run_id: str, shards: tuple[Shard, ...], *, deployment: str, max_resubmits: int,
    generation: int,
) -> tuple[list[runner.ShardResult], list[tuple[str, str]]]:
    """Submit one child run per shard and wait for all; returns (results, failed shards)."""
    logger = get_run_logger()
    progress = tasks.Progress(len(shards), run_id)  # per finished shard (the children report their own pages)
    active = {s.shard_id: ChildRun(s, _submit(s, config, run_id, deployment, 1, generation)) for s in shards}
    logger.info("submitted %d shard runs to %s", len(active), deployment)
    results: list[runner.ShardResult] = []
    failed: list[tuple[str, str]] = []
    with get_client(sync_client=True) as client:
        while active:
            time.sleep(POLL_INTERVAL_S)
            try:
                states = _state_types(client, [c.flow_run_id for c in active.values()])
            except httpx.TransportError as exc:  # the API blinked: the children carry on, ask again
                logger.warning("could not read child run states (%s); retrying", exc)
                continue
            for shard_id, child in list(active.items()):
                state_type = states.get(child.flow_run_id)
                ended = state_type.value if state_type else "?"
                verdict = triage(state_type, child.attempts, max_resubmits)
                if verdict == "done":
                    results.append(_read_result(client, child))
                    del active[shard_id]
                    progress.advance()
                elif verdict == "resubmit":
                    child.attempts += 1
                    logger.warning("shard %s run %s ended %s: resubmitting (attempt %d)",
                                   shard_id, child.flow_run_id, ended, child.attempts)
                    child.flow_run_id = _submit(child.shard, config, run_id, deployment, child.attempts, generation)
                elif verdict == "failed":
                    failed.append((shard_id, f"child run {child.flow_run_id} ended {ended}"))
                    logger.error("shard %s failed for good: %s", shard_id, failed[-1][1])
                    del active[shard_id]
                    progress.advance()
    return results, failed


_EXTRA = [
    inspect.Parameter("shard_deployment", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_SHARD_DEPLOYMENT,
                      annotation=str),
    inspect.Parameter("max_resubmits", inspect.Parameter.KEYWORD_ONLY, default=POLICY.child_run_resubmits,
                      annotation=int),
]
_EXTRA_HELP = {
    "shard_deployment": "Deployment of the docpipe-process-shard flow that workers take shards from "
    "('flow-name/deployment-name').",
    "max_resubmits": "How many times a shard whose child run failed or crashed is submitted again.",
}


@dataclass
class FanOut(tasks.PrefectExecution):
    """Every shard as a child flow run of `deployment`, resubmitted up to `max_resubmits` times."""

    deployment: str = DEFAULT_SHARD_DEPLOYMENT
    max_resubmits: int = POLICY.child_run_resubmits

    def process(self, run: runner.Run, plan: runner.WorkPlan) -> runner.Shards:
        results, failed = fan_out(run.config, run.run_id, plan.shards, deployment=self.deployment,
                                  max_resubmits=self.max_resubmits, generation=run.handle.lease.generation)
        return runner.Shards(results, failed)


@flow(name=PARENT_FLOW_NAME, validate_parameters=False, persist_result=False)
@with_config_parameters(
    "Ingest a folder or bucket into Parquet by fanning shards out to workers (one child flow run per shard).",
    extra=_EXTRA,
    extra_help=_EXTRA_HELP,
)
def fanout(**params: Any) -> Any:
    execution = FanOut(str(params.pop("shard_deployment", DEFAULT_SHARD_DEPLOYMENT)),
                       int(params.pop("max_resubmits", POLICY.child_run_resubmits)))
    return tasks.run_flow(params, execution)
