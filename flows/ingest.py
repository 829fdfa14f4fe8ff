"""The `docpipe-ingest` flow: one machine, every shard of a run as one task each.

Its parameters are exactly `RunConfig`'s fields, generated from the model (see
`flows.parameters`), so `prefect deployment run 'docpipe-ingest/<name>' --param
source=s3://bucket/prefix --param output=s3://bucket/out` takes the same settings as
`docpipe run`. Shards run one after another in this process, sharing one loaded model;
a failed shard does not stop the others, and the flow fails at the end naming them (a
rerun resumes: finished shards are skipped). A run that cannot start or go on (bad settings,
missing source, busy or changed output, broken device) ends Failed with one line as its
state message and no traceback (`tasks.expected_failures`); anything else keeps its traceback.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows import tasks
from flows.parameters import build_config, public_url, with_config_parameters
from pipeline import runner
from pipeline.config import RunConfig

FLOW_NAME = "docpipe-ingest"


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


def run_shards_here(config: RunConfig, run_id: str) -> dict[str, Any]:
    """Own the output, discover, process every shard as a task in this process, publish artifacts."""
    logger = get_run_logger()
    try:
        handle = tasks.begin(config, run_id)
    except BaseException as exc:
        tasks.report_failure(run_id, tasks.describe_failure(exc))
        raise
    try:
        plan = tasks.discover_task(config, handle)
        progress = tasks.Progress(len(plan.shards), run_id, plan)
        results: list[runner.ShardResult] = []
        failed: list[tuple[str, str]] = []
        for shard in plan.shards:
            state = tasks.process_shard_task(shard, config, run_id, handle.lease, return_state=True)
            if state.is_completed():
                results.append(state.result())
            else:
                failed.append((shard.shard_id, state.message or state.name))
                logger.error("shard %s failed: %s", shard.shard_id, state.message)
            progress.advance()
    except BaseException as exc:
        runner.end_run(handle, runner.ended_status(exc), None, runner.describe_end(exc))
        tasks.report_failure(run_id, tasks.describe_failure(exc))
        raise
    return tasks.finish_run(results, failed, plan=plan, config=config, handle=handle)


@flow(name=FLOW_NAME, validate_parameters=False, persist_result=False)
@with_config_parameters(
    "Ingest a folder or bucket of PDFs and scans into Parquet (pages and documents tables), on this machine."
)
def ingest(**params: Any) -> Any:
    try:
        config = build_config(params)
        run_id = resolve_run_id(config)
        log_config(config, run_id)
        return run_shards_here(config, run_id)
    except tasks.expected_failures() as exc:  # one line in the run's state, no traceback
        return tasks.failed_run(exc)
