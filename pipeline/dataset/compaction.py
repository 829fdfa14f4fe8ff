"""Compaction: merging small committed shards (and finished runs' rows) into larger files.

Nightly runs add a few small shard files each; `compact` merges them into shards
named `c-<hash>`. The switch is one atomic write, the merged documents file; just
before it, a manifest `_docpipe/compactions/<table>-<merged>.json` names the shards it
replaces. Once the merged file exists, readers of committed shards (`open_table`,
`read_state`) hide the replaced ones, so they see the old files or the merged one:
never both, never neither. The old files are removed `grace_s` later (readers that
listed before the switch can still open them); a compaction cut short is finished by
the next one. Globbing readers (`read_parquet('out/pages/*.parquet')`) do not read
manifests: they see the replaced rows twice from the merged write until the removal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.store import (
    DOCUMENTS,
    GENERATION_KEY,
    META,
    PAGES,
    PAGES_ROWS_KEY,
    RUNS,
    _age_s,
    _Store,
    _utcnow,
    conform,
    shard_file_name,
)
from pipeline.records import RunStatus
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, RUNS_SCHEMA

if TYPE_CHECKING:
    from pipeline.dataset.lease import Lease

log = logging.getLogger("pipeline.dataset")

COMPACT_TARGET_ROWS = 50_000  # compaction: pages rows per merged file at most
COMPACT_GRACE_S = 10.0  # between the switch and removing the replaced files
COMPACT_MANIFEST_KEEP_S = 3600.0  # a manifest outlives its replaced files this long


class _CompactOps(_Store):
    """`compact`, and the manifests that readers use to hide replaced shards (methods of Dataset)."""

    def _manifest_path(self, table: str, merged: str) -> str:
        return self.path(META, "compactions", f"{table}-{merged}.json")

    def _manifests(self) -> list[tuple[str, dict[str, Any], float | None]]:
        """(path, manifest, age in seconds) of every compaction manifest."""
        out = []
        now = time.time()
        for entry in self._listing(self.path(META, "compactions")):
            name = entry["name"].rsplit("/", 1)[-1]
            if name.startswith(".") or not name.endswith(".json"):
                continue
            data = self.read_json(entry["name"])
            if isinstance(data, dict) and data.get("table") in (DOCUMENTS, RUNS):
                out.append((entry["name"], data, _age_s(entry, now)))
        return out

    def _hidden(self, table: str, present: Mapping[str, str]) -> set[str]:
        hidden: set[str] = set()
        for _path, data, _age in self._manifests():
            if data["table"] == table and data.get("merged") in present:
                hidden.update(str(s) for s in data.get("replaces", []))
        return hidden

    def compact(
        self,
        *,
        target_rows: int = COMPACT_TARGET_ROWS,
        wait_s: float = 0.0,
        grace_s: float = COMPACT_GRACE_S,
    ) -> "CompactionResult":
        """Merge small committed shards (and finished runs' rows) into larger files.

        Takes the output's lease (no run writes meanwhile; OutputBusy if one holds it),
        tidies it as a run would (`clean`), finishes an earlier compaction cut short, then
        merges groups of shards whose pages files hold fewer than `target_rows / 2` rows,
        up to `target_rows` pages rows a group, in commit order. Only files written with
        the current schema are merged (older files stay as they are). Rows keep every
        value but `shard_id`, which names the merged shard, as for any shard.
        """
        t0 = time.perf_counter()
        lease = self.acquire(f"compact-{_utcnow():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}", wait_s=wait_s)
        with lease:
            self.repair(lease)
            self.clean(generation=lease.generation)
            self._finish_compactions(keep_s=COMPACT_MANIFEST_KEEP_S)
            files_before = sum(len(self.part_files(t)) for t in (PAGES, DOCUMENTS, RUNS))
            merged: list[tuple[str, str, list[str]]] = []  # (table, merged id, replaced ids)
            rows = 0
            for group in plan_compaction(self._shard_sizes(target_rows), target_rows):
                rows += self._merge_shards(group, lease)
                merged.append((DOCUMENTS, compacted_id(group), group))
            runs = self._finished_run_parts()
            if len(runs) >= 2:
                self._merge_runs(runs, lease)
                merged.append((RUNS, compacted_id(runs), runs))
            if merged and grace_s > 0:
                time.sleep(grace_s)  # readers that listed before the switch may still be opening old files
            for table, merged_id, replaced in merged:
                lease.ensure()
                self._remove_replaced(table, replaced)
            files_after = sum(len(self.part_files(t)) for t in (PAGES, DOCUMENTS, RUNS))
        return CompactionResult(
            shards_merged=sum(len(g) for t, _m, g in merged if t == DOCUMENTS),
            merged_files=sum(1 for t, _m, _g in merged if t == DOCUMENTS),
            runs_merged=sum(len(g) for t, _m, g in merged if t == RUNS),
            pages_rows=rows,
            files_before=files_before,
            files_after=files_after,
            seconds=time.perf_counter() - t0,
        )

    def _current_schema(self, path: str, schema: pa.Schema) -> bool:
        found = pq.read_schema(path, filesystem=self.arrow_fs())
        version = (schema.metadata or {}).get(b"docpipe.schema_version")
        return found.equals(schema, check_metadata=False) and (found.metadata or {}).get(
            b"docpipe.schema_version") == version

    def _shard_sizes(self, target_rows: int) -> list[tuple[str, int]]:
        """(shard, pages rows) of live committed shards worth merging, in commit order."""
        docs = {e["name"]: e for e in self._listing(self.path(DOCUMENTS))}
        committed = self.part_files(DOCUMENTS)
        hidden = self._hidden(DOCUMENTS, committed)
        pages = self.part_files(PAGES)
        now = time.time()
        sizes: list[tuple[float, str, int]] = []
        for shard, doc_path in committed.items():
            if shard in hidden or shard not in pages:
                continue
            if not (self._current_schema(doc_path, DOCUMENTS_SCHEMA)
                    and self._current_schema(pages[shard], PAGES_SCHEMA)):
                continue
            count = pq.read_metadata(pages[shard], filesystem=self.arrow_fs()).num_rows
            if count * 2 >= target_rows:
                continue  # already large
            age = _age_s(docs.get(doc_path, {}), now)
            sizes.append((-(age or 0.0), shard, count))
        return [(shard, count) for _order, shard, count in sorted(sizes)]

    def _merge_shards(self, group: Sequence[str], lease: "Lease") -> int:
        """Write the merged pages file, the manifest, then the merged documents file (the switch)."""
        merged = compacted_id(group)
        tables = {}
        for table, schema in ((PAGES, PAGES_SCHEMA), (DOCUMENTS, DOCUMENTS_SCHEMA)):
            parts = [self._read_part(self.shard_path(table, s), schema) for s in group]
            combined = pa.concat_tables(parts)
            column = pa.array([merged] * combined.num_rows, pa.string())
            index = combined.schema.get_field_index("shard_id")
            tables[table] = conform(combined.set_column(index, combined.schema.field(index), column), schema)
        lease.ensure()
        self.write_table(self.shard_path(PAGES, merged), tables[PAGES])
        manifest = {"table": DOCUMENTS, "merged": merged, "replaces": list(group), "created_at": time.time()}
        self.write_bytes(self._manifest_path(DOCUMENTS, merged), json.dumps(manifest, sort_keys=True).encode())
        lease.ensure()
        meta = {GENERATION_KEY: str(lease.generation).encode(), PAGES_ROWS_KEY: str(tables[PAGES].num_rows).encode()}
        self.write_table(self.shard_path(DOCUMENTS, merged), tables[DOCUMENTS], metadata=meta)
        log.info("merged %d shards into %s (%d pages rows)", len(group), merged, tables[PAGES].num_rows)
        return tables[PAGES].num_rows

    def _finished_run_parts(self) -> list[str]:
        """Run ids of runs rows that no run will write again (not 'running'), current schema."""
        parts = self.part_files(RUNS)
        hidden = self._hidden(RUNS, parts)
        out = []
        for run_id, path in sorted(parts.items()):
            if run_id in hidden or not self._current_schema(path, RUNS_SCHEMA):
                continue
            statuses = self._read_part(path, RUNS_SCHEMA).column("status").to_pylist()
            if statuses and RunStatus.RUNNING not in statuses:
                out.append(run_id)
        return out

    def _merge_runs(self, run_ids: Sequence[str], lease: "Lease") -> None:
        merged = compacted_id(run_ids)
        table = pa.concat_tables([self._read_part(self.path(RUNS, shard_file_name(r)), RUNS_SCHEMA) for r in run_ids])
        manifest = {"table": RUNS, "merged": merged, "replaces": list(run_ids), "created_at": time.time()}
        lease.ensure()
        self.write_bytes(self._manifest_path(RUNS, merged), json.dumps(manifest, sort_keys=True).encode())
        self.write_table(self.path(RUNS, shard_file_name(merged)), conform(table, RUNS_SCHEMA))

    def _remove_replaced(self, table: str, replaced: Iterable[str]) -> None:
        folders = (DOCUMENTS, PAGES) if table == DOCUMENTS else (RUNS,)  # documents first: un-commit, then pages
        for shard in replaced:
            for folder in folders:
                self.remove(self.shard_path(folder, shard))

    def _finish_compactions(self, *, keep_s: float) -> None:
        """Finish what a compaction cut short, and drop manifests nothing needs any more.

        A manifest whose merged file exists: its replaced files still present are removed;
        the manifest itself goes once it is `keep_s` old (a reader lists the documents
        before reading manifests, so one that saw the old files and the merged one still
        finds it). A manifest whose merged file does not exist (cut short before the
        switch): it and the merged pages file are removed.
        """
        for path, data, age in self._manifests():
            table, merged = data["table"], str(data.get("merged"))
            if table == DOCUMENTS:
                present = self.shard_done(merged)
            else:
                present = bool(self.fs.exists(self.path(RUNS, shard_file_name(merged))))
            if not present:
                if table == DOCUMENTS:
                    self.remove(self.shard_path(PAGES, merged))
                self.remove(path)
                continue
            self._remove_replaced(table, [str(s) for s in data.get("replaces", [])])
            if age is not None and age > keep_s:
                self.remove(path)


# ---------------------------------------------------------------------------------------
# Compaction (see Dataset.compact)
# ---------------------------------------------------------------------------------------


def compacted_id(shards: Iterable[str]) -> str:
    """The merged shard's id: `c-` and a hash of the ids it replaces (the same group, the same id)."""
    digest = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()
    return f"c-{digest[:20]}"


def plan_compaction(sizes: Sequence[tuple[str, int]], target_rows: int) -> list[list[str]]:
    """Groups of consecutive shards (in the order given) of at most `target_rows` rows in
    all; groups of one shard are left out (nothing to gain)."""
    groups: list[list[str]] = []
    current: list[str] = []
    rows = 0
    for shard, count in sizes:
        if current and rows + count > target_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(shard)
        rows += count
    if current:
        groups.append(current)
    return [g for g in groups if len(g) >= 2]


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What `Dataset.compact` did."""

    shards_merged: int
    merged_files: int
    runs_merged: int
    pages_rows: int
    files_before: int
    files_after: int
    seconds: float

    def describe(self) -> str:
        if not self.shards_merged and not self.runs_merged:
            return f"nothing to compact ({self.files_before} part files)"
        done = []
        if self.shards_merged:
            done.append(f"merged {self.shards_merged} shards into {self.merged_files} ({self.pages_rows} pages rows)")
        if self.runs_merged:
            done.append(f"merged {self.runs_merged} runs rows into one file")
        return f"{'; '.join(done)}: {self.files_before} part files -> {self.files_after}, in {self.seconds:.1f} s"
