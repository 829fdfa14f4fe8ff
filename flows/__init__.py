"""Prefect orchestration of docpipe: a thin layer over `pipeline.runner`.

- `flows.ingest:ingest` (flow `docpipe-ingest`): a whole run on one machine, one task per shard.
- `flows.fanout:fanout` (flow `docpipe-fanout`): a parent that fans shards out to workers.
- `flows.fanout:process_shard_flow` (flow `docpipe-process-shard`): one shard, the fan-out child.
- `flows.deploy:serve`: `docpipe serve`, the ingest flow served from one process.

Flow parameters are generated from `pipeline.config.RunConfig` (`flows.parameters`).
"""
