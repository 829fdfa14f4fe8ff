"""Reading the output back: the committed files of a table, what is done (the protocol's
step 5), and the runs table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.dataset.store import DOCUMENTS, PAGES, RUNS, _Store, _warn_once, conform, shard_file_name
from pipeline.ledger import POLICY, RetryPolicy, retry_in_later_run
from pipeline.records import KnownFile
from pipeline.sources import full_uri
from schemas import RUNS_SCHEMA, SCHEMAS, TABLE_KEY


@dataclass(frozen=True, slots=True)
class DoneState:
    """What an output dataset already holds (for planning a run)."""

    shard_ids: frozenset[str] = frozenset()  # committed shards
    doc_keys: frozenset[tuple[str, str]] = frozenset()  # (source_uri, doc_id) that are done
    # doc_id -> a source URI whose pages are in the dataset (status ok or partial)
    processed: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    # (source_uri, doc_id) -> attempts so far, for documents to try again (retryable failures)
    retry: Mapping[tuple[str, str], int] = field(default_factory=dict, hash=False, compare=False)
    # source_uri -> size, version, id and media type, for files recorded with a version:
    # discovery skips re-reading those whose listing still shows the same size and version.
    known: Mapping[str, KnownFile] = field(default_factory=dict, hash=False, compare=False)
    fingerprints: frozenset[str] = frozenset()  # config fingerprints of the documents rows
    # source_uri -> doc_id of its done row (the version of the file the output holds; "" for a
    # file recorded as unreadable, which has no content hash)
    versions: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    # source_uri -> every doc_id the output holds rows of for it (normally one)
    ids: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False, compare=False)


def _row_order(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Documents rows in attempt order, so a later attempt's verdict wins."""
    return (row[0], row[1], int(row[7] or 1))


class _ReadOps(_Store):
    """Reading committed files back, and the runs table (methods of Dataset)."""

    # ---- reading back --------------------------------------------------------------------
    def open_table(self, table: str) -> ds.Dataset:
        """The committed files of one table as a pyarrow dataset (uncommitted pages never show)."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
        paths = self.committed_paths(table)  # hides shards a finished compaction replaced
        return ds.dataset(paths, schema=SCHEMAS[table], format="parquet", filesystem=self.arrow_fs())

    def read_state(
        self, *, fingerprint: str | None = None, reprocess: bool = False, policy: RetryPolicy = POLICY,
        retry_timeouts: bool = False,
    ) -> DoneState:
        """Committed shards and which documents are done (see the module docstring, step 5).
        `retry_timeouts`: documents whose row is a (final) `document_timeout` are tried again."""
        parts = self.part_files(DOCUMENTS)
        if not parts:
            return DoneState()
        names = ["source_uri", "doc_id", "status", "size_bytes", "source_version", "media_type",
                 "error_retryable", "attempt", "config_fingerprint", "error_type"]
        table = self.open_table(DOCUMENTS).to_table(columns=names)
        cols = {n: table.column(n).to_pylist() for n in names}
        done: set[tuple[str, str]] = set()
        retry: dict[tuple[str, str], int] = {}
        processed: dict[str, str] = {}
        known: dict[str, KnownFile] = {}
        versions: dict[str, str] = {}
        ids: dict[str, set[str]] = {}
        rows = zip(*(cols[n] for n in names))
        for uri, doc_id, status, size, version, media, retryable, attempt, fp, etype in sorted(rows, key=_row_order):
            key = (uri, doc_id)
            ids.setdefault(uri, set()).add(doc_id)
            if reprocess and fingerprint is not None and fp != fingerprint:
                continue  # written with other settings: this run does it again
            attempts = int(attempt or 1)
            if retry_in_later_run(bool(retryable), attempts, etype, retry_timeouts=retry_timeouts, policy=policy):
                if key not in done:
                    retry[key] = max(retry.get(key, 0), attempts)
                versions.setdefault(uri, doc_id)  # a changed file's new version replaces this row too
                continue
            done.add(key)
            retry.pop(key, None)
            versions[uri] = doc_id
            if status in ("ok", "partial"):
                processed.setdefault(doc_id, uri)
            if version and doc_id and size is not None and media:
                known[uri] = KnownFile(size=size, version=version, doc_id=doc_id, media_type=media)
        return DoneState(
            shard_ids=frozenset(parts),
            doc_keys=frozenset(done),
            processed=processed,
            retry=retry,
            known=known,
            fingerprints=frozenset(fp for fp in cols["config_fingerprint"] if fp),
            versions=versions,
            ids={uri: frozenset(found) for uri, found in ids.items()},
        )

    def committed_paths(self, table: str) -> list[str]:
        """Paths of `table`'s committed part files, without shards a compaction replaced.

        The documents folder is listed first, then the manifests, then the pages folder. A
        committed shard without a pages file is either one whose pages are still staged (a
        commit in progress, or cut short: see `commit_shard`) or one a compaction replaced
        and removed between the listings; in the second case the documents folder has
        changed meanwhile, so it is listed again (a few times) rather than rows returned short.
        """
        if table == RUNS:
            parts = self.part_files(RUNS)
            hidden = self._hidden(RUNS, parts)
            return sorted(p for s, p in parts.items() if s not in hidden)
        previous: set[str] | None = None
        for _attempt in range(5):
            committed = self.part_files(DOCUMENTS)
            hidden = self._hidden(DOCUMENTS, committed)
            live = {s: p for s, p in committed.items() if s not in hidden}
            if table == DOCUMENTS:
                return sorted(live.values())
            pages = self.part_files(PAGES)
            if all(s in pages for s in live) or set(committed) == previous:
                break
            previous = set(committed)
        return sorted(p for s, p in pages.items() if s in live)

    # ---- runs ---------------------------------------------------------------------------
    def write_run(self, row: Mapping[str, Any]) -> None:
        """Write (or replace) this run's row of the runs table."""
        table = pa.Table.from_pylist([dict(row)], schema=RUNS_SCHEMA)
        self.write_table(self.path(RUNS, shard_file_name(str(row["run_id"]))), conform(table, RUNS_SCHEMA))

    def read_runs(self) -> list[dict[str, Any]]:
        """Rows of the runs table, oldest first: in the order of the lease generations the runs
        held (the output's own order; wall clocks of different machines disagree), rows
        written before runs recorded their generation first, by `started_at`. A runs file
        that is not a runs table of this schema is left out (one warning; `verify` reports it
        and the next run moves it to the quarantine)."""
        rows: list[dict[str, Any]] = []
        for path in self.committed_paths(RUNS):
            found, problem = self._runs_file(path)
            if problem is not None:
                _warn_once(path, "runs file %s is left out: %s", full_uri(self.fs, path), problem[1])
                continue
            rows += found or []
        return sorted(rows, key=run_order)

    def _runs_file(self, path: str) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None]:
        """(rows, None) of a runs file that is a runs table of this schema, else (None, (kind,
        detail)): `runs_unreadable` (not Parquet, truncated), `runs_foreign` (a Parquet file
        that is not a docpipe runs table) or `runs_schema` (a required column missing, of
        another type, or null). Columns of a newer minor version are ignored; columns this
        version added are null in older files."""
        name = path.rsplit("/", 1)[-1]
        try:
            table = pq.read_table(path, filesystem=self.arrow_fs())
        except FileNotFoundError:
            return [], None
        except Exception as exc:  # noqa: BLE001 - truncated, zeroed, not Parquet
            return None, ("runs_unreadable", f"runs file {name} does not read ({type(exc).__name__})")
        if (table.schema.metadata or {}).get(TABLE_KEY) != b"runs":
            return None, ("runs_foreign", f"runs file {name} is not a docpipe runs table (no docpipe.table = runs "
                                          "in its metadata)")
        absent = [f for f in RUNS_SCHEMA if f.name not in table.column_names]
        required = [f.name for f in absent if not f.nullable]
        if required:
            return None, ("runs_schema", f"runs file {name} lacks the required columns {', '.join(required)}")
        try:
            for column in absent:
                table = table.append_column(column, pa.nulls(table.num_rows, column.type))
            table = conform(table.select(RUNS_SCHEMA.names), RUNS_SCHEMA)
        except (pa.ArrowException, ValueError) as exc:
            return None, ("runs_schema", f"runs file {name} does not match the runs schema ({exc})")
        return table.to_pylist(), None


def run_order(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key of runs rows, oldest first: by the lease generation the run held (rows without
    one, from versions before it was recorded, first), then by `started_at`."""
    generation = row.get("lease_generation")
    return (generation is not None, generation or 0, row["started_at"])
