"""The output as a dataset: the one home of its commit protocol.

Layout under the output root (a folder or any fsspec URL):

    pages/part-<shard>.parquet          one file per shard
    documents/part-<shard>.parquet      written last: the shard's commit marker
    runs/part-<run>.parquet             one row per run (settings, versions, counts)
    _docpipe/lease/<generation>.json    who owns the output now (one run at a time)
    _docpipe/plans/<shard>.json         a shard's documents, written before its files

The protocol, which every writer follows:

1. **Lease.** A run owns the output while it holds the newest lease generation and keeps
   it fresh (heartbeat). A generation file is created exclusively (`O_EXCL`-style link on
   local disks, `If-None-Match: *` on S3), so two runs can never both take the same
   generation; a new owner takes `generation + 1` only once the old lease has expired or
   was released (or, on the same host, its process is gone). Fanned-out shard runs act
   under their parent's generation and stop before committing once a newer one exists.
2. **Plans before work.** Shards are cut under the lease and each plan is written before
   any of its files. A rerun replays an uncommitted plan under the same shard id (its
   files are overwritten whole) instead of re-sharding its documents.
3. **Commit.** A shard stages its pages file (`_docpipe/staging/pages/`), writes its
   documents file (the commit point), then moves the pages file into `pages/`; each file
   appears whole or not at all (temp + rename locally, one PUT or server-side copy on
   object stores). So pages of an uncommitted shard are never under `pages/`; a crash
   after the commit leaves the shard's pages staged until the next run moves them in
   (roll forward). The plan is removed after the commit.
4. **Cleanup** only under the lease: stale temp files, pages files with neither a
   documents file nor a plan, plans of committed shards, and documents rows superseded
   by a retry of a retryable failure.
5. **What is done.** A documents row marks its (source_uri, doc_id) done unless it is a
   retryable failure with attempts left, or it was written with other output settings
   and the run reprocesses.

`sink` only turns rows into Arrow tables; this package decides where and when they land:

    store.py       file naming, atomic and exclusive writes, listings, conforming tables
    lease.py       lease records, the owner's liveness, taking the lease, a held `Lease`
    plans.py       plan records (step 2)
    commit.py      staging, the fenced commit, publishing pages, superseded rows, cleanup (3, 4)
    reading.py     committed files, what is done (step 5), the runs table
    verify.py      verify and repair (quarantine)
    compaction.py  merging small shards, and the manifests readers honour

`Dataset` is one class composed of the operations of these modules.
"""

from __future__ import annotations

from pipeline.dataset.commit import _CommitOps
from pipeline.dataset.compaction import CompactionResult, _CompactOps, compacted_id, plan_compaction
from pipeline.dataset.lease import (
    HEARTBEAT_S,
    LEASE_TTL_S,
    Lease,
    LeaseInfo,
    LeaseLost,
    OutputBusy,
    _LeaseOps,
)
from pipeline.dataset.plans import PlanRecord, _PlanOps
from pipeline.dataset.reading import DoneState, _ReadOps
from pipeline.dataset.store import (
    DOCUMENTS,
    GENERATION_KEY,
    META,
    PAGES,
    PAGES_ROWS_KEY,
    RUNS,
    OutputNotWritable,
    OutputUnsafe,
    conform,
    fault_point,
    shard_file_name,
    shard_id_of,
)
from pipeline.dataset.verify import Problem, _VerifyOps


class Dataset(_ReadOps, _CommitOps, _VerifyOps, _CompactOps, _PlanOps, _LeaseOps):
    """An output root and the operations of its commit protocol."""


__all__ = [
    "CompactionResult",
    "DOCUMENTS",
    "Dataset",
    "DoneState",
    "GENERATION_KEY",
    "HEARTBEAT_S",
    "LEASE_TTL_S",
    "Lease",
    "LeaseInfo",
    "LeaseLost",
    "META",
    "OutputBusy",
    "OutputNotWritable",
    "OutputUnsafe",
    "PAGES",
    "PAGES_ROWS_KEY",
    "PlanRecord",
    "Problem",
    "RUNS",
    "compacted_id",
    "conform",
    "fault_point",
    "plan_compaction",
    "shard_file_name",
    "shard_id_of",
]
