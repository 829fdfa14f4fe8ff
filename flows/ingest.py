"""The `docpipe-ingest` flow: one machine, every shard of a run as one task each.

Its parameters are exactly `RunConfig`'s fields, generated from the model (see
`flows.parameters`), so `prefect deployment run 'docpipe-ingest/<name>' --param
source=s3://bucket/prefix --param output=s3://bucket/out` takes the same settings as
`docpipe run`. The run's lifecycle is `pipeline.runner.Run` (`tasks.run_flow`); this module
is its shard execution: shards run one after another in this process as tasks, sharing one
loaded model; a failed shard does not stop the others, and the flow fails at the end naming
them (a rerun resumes: finished shards are skipped). A run that cannot start or go on (bad
settings, missing source, busy or changed output, broken device) ends Failed with one line
as its state message and no traceback (`pipeline.outcomes`); anything else keeps its traceback.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows import tasks
from flows.parameters import with_config_parameters
from pipeline import runner

FLOW_NAME = "docpipe-ingest"


class InTasks(tasks.PrefectExecution):
    """Every shard as a task of this flow run, in plan order; a failed shard is noted and the
    others go on."""

    def process(self, run: runner.Run, plan: runner.WorkPlan) -> runner.Shards:
        progress = tasks.Progress(len(plan.shards), run.run_id, plan)
        shards = runner.Shards()
        for shard in plan.shards:
            state = tasks.process_shard_task(shard, run.config, run.run_id, run.handle.lease, return_state=True)
            if state.is_completed():
                shards.results.append(state.result())
            else:
                shards.failed.append((shard.shard_id, state.message or state.name))
                get_run_logger().error("shard %s failed: %s", shard.shard_id, state.message)
            progress.advance()
        return shards


@flow(name=FLOW_NAME, validate_parameters=False, persist_result=False)
@with_config_parameters(
    "Ingest a folder or bucket of PDFs and scans into Parquet (pages and documents tables), on this machine."
)
def ingest(**params: Any) -> Any:
    return tasks.run_flow(params, InTasks())
