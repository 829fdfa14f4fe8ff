"""Discovery: what a run has to do. List and hash the source, read what the output already
holds, replay an unfinished run's shards, cut the rest into shards, and write every shard's plan
before any of its files (`discover_work`, called by `pipeline.runner.Run` while it owns the output).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config import RunConfig
from pipeline.dataset import DOCUMENTS, Dataset, Lease, PlanRecord
from pipeline.planning import Shard, ShardPlan, plan_shards
from pipeline.records import DocumentRef

log = logging.getLogger("docpipe")


class Owner(Protocol):
    """What discovery needs of the run that owns the output (`pipeline.runner.RunHandle`)."""

    run_id: str
    dataset: Dataset
    lease: Lease


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


def discover_work(config: RunConfig, handle: Owner) -> WorkPlan:
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


__all__ = ["Owner", "WorkPlan", "discover_work"]
