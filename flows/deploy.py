"""`docpipe serve`: serve the ingest flow from this process (`flow.serve`, one machine).

No work pool or worker is needed: the process polls the Prefect API for runs of its
deployment and executes them (each in a subprocess). For several machines or GPUs use
the work-pool deployments of `prefect.yaml` instead (see docs/deployment.md).
"""

from __future__ import annotations

from typing import Any

from prefect import serve as prefect_serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.ingest import ingest
from flows.parameters import build_config

REQUIRED_FOR_SCHEDULE = ("source", "output")


def ingest_deployment(
    name: str = "docpipe",
    cron: str | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    tags: list[str] | None = None,
) -> RunnerDeployment:
    """The ingest flow as a served deployment (module entrypoint: works from any directory).

    A schedule needs `source` and `output` among `parameters` (a scheduled run has no one
    to pass them); parameters given are checked against RunConfig here, before serving.
    """
    parameters = dict(parameters or {})
    if cron and not all(parameters.get(k) for k in REQUIRED_FOR_SCHEDULE):
        raise ValueError(
            "a cron schedule needs default parameters 'source' and 'output' "
            "(e.g. parameters={'source': 's3://bucket/incoming', 'output': 's3://bucket/docpipe'})"
        )
    if all(parameters.get(k) for k in REQUIRED_FOR_SCHEDULE):
        build_config(parameters)  # fail now, not at 02:00
    return ingest.to_deployment(
        name=name,
        cron=cron,
        parameters=parameters,
        tags=tags or ["docpipe"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="docpipe: documents -> pages -> tiles -> VLM -> Parquet (served from one process).",
    )


def serve(
    name: str = "docpipe",
    cron: str | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    limit: int | None = 1,
) -> None:
    """Serve `docpipe-ingest/<name>` until interrupted; `limit` runs at a time (1: one GPU)."""
    deployment = ingest_deployment(name, cron, parameters=parameters)
    prefect_serve(deployment, limit=limit, pause_on_shutdown=False)
