"""Verifying what a run resumes from, and repairing it: damaged files and the files that
depend on them go to `_docpipe/quarantine/` (never deleted), and their documents are redone.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.dataset.store import (
    DOCUMENTS,
    GENERATION_KEY,
    META,
    PAGES,
    PAGES_ROWS_KEY,
    RUNS,
    _join,
    _Store,
    _utcnow,
    shard_file_name,
    shard_id_of,
)
from pipeline.ledger import TIMEOUT_ERROR
from pipeline.records import RunStatus
from pipeline.sources import full_uri
from schemas import RUNS_SCHEMA

if TYPE_CHECKING:
    from pipeline.dataset.lease import Lease

log = logging.getLogger("pipeline.dataset")


@dataclass(frozen=True, slots=True)
class Problem:
    """Something `Dataset.verify` found wrong with an output (and whether it was repaired)."""

    kind: str
    path: str
    detail: str
    repaired: bool = False
    moved_to: str | None = None

    def describe(self) -> str:
        done = f" -> moved to {self.moved_to}" if self.moved_to else (" (repaired)" if self.repaired else "")
        return f"{self.kind}: {self.detail}{done}"


class _VerifyOps(_Store):
    """`verify` and `repair` (methods of Dataset)."""

    # ---- verification and repair -----------------------------------------------------
    def _quarantine(self, path: str, stamp: str) -> str:
        """Move `path` under `_docpipe/quarantine/<stamp>/` (never deleted); returns the new path."""
        rel = path[len(self.root.rstrip("/")) + 1:] if path.startswith(self.root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
        target = self.path(META, "quarantine", stamp, rel)
        if self.local:
            self._guard(path)  # never moves a file from, or into, a place a link leads to
            self._guard(target)
            os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            try:
                os.replace(path, target)
            except FileNotFoundError:
                return target
        else:
            try:
                self.fs.copy(path, target)
            except FileNotFoundError:
                return target
            self.remove(path)
        return target

    def verify(self, *, repair: bool = False, lease: "Lease | None" = None) -> list["Problem"]:
        """Check what a run resumes from, cheaply (Parquet footers, listings), and with
        `repair` (under the output's lease) mend it: damaged files and the files that
        depend on them are moved to `_docpipe/quarantine/` and their documents are redone
        by the next run. Returns what was found (repaired or not).

        A shard counts as committed only when its documents file reads, its pages file is
        there (or still staged after its commit: rolled forward) and reads, and holds the
        row count the documents file recorded. Also found: pages files no documents file
        owns, unreadable runs files, malformed plans, shards committed twice over the same
        documents (the older lease generation's copy goes), rows of a file's older version
        after its newer version committed (dropped), and runs rows left `running` by a run
        that no longer holds the output (marked `interrupted`).
        """
        if repair and lease is not None:
            lease.ensure()
            self._fence_stages(lease.generation)
        stamp = f"{_utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        problems: list[Problem] = []

        def found(kind: str, path: str, detail: str, *also: str) -> None:
            moved = None
            if repair:
                moved = self._quarantine(path, stamp)
                for extra in also:
                    if self.fs.exists(extra):
                        self._quarantine(extra, stamp)
            problems.append(Problem(kind, full_uri(self.fs, path), detail, repaired=repair,
                                    moved_to=None if moved is None else full_uri(self.fs, moved)))

        committed = self.part_files(DOCUMENTS)
        hidden = self._hidden(DOCUMENTS, committed)
        pages = self.part_files(PAGES)
        staged = {shard_id_of(e["name"]): e["name"] for folder in self._subfolders(self.path(META, "staging"))
                  for e in self._listing(_join(self.path(META, "staging"), folder, PAGES))}
        staged.update({shard_id_of(e["name"]): e["name"] for e in self._listing(self.path(META, "staging", PAGES))})
        generations: dict[str, int] = {}
        for shard, doc_path in sorted(committed.items()):
            pages_path = pages.get(shard, self.shard_path(PAGES, shard))
            try:
                meta = self._footer(doc_path)
            except Exception as exc:  # noqa: BLE001 - truncated, zeroed, not Parquet
                found("documents_unreadable", doc_path, f"documents file of shard {shard} does not read "
                      f"({type(exc).__name__})", pages_path)
                continue
            kv = meta.metadata or {}
            generations[shard] = int(kv.get(GENERATION_KEY, b"0") or 0)
            if shard in hidden:
                continue
            if shard not in pages:
                if shard in staged:
                    if repair and self._publish_pages(shard, stage=staged[shard].rsplit("/", 1)[0]):
                        log.info("finished the commit of shard %s (its pages were still staged)", shard)
                        continue
                    if not repair:
                        problems.append(Problem("pages_staged", full_uri(self.fs, doc_path),
                                                f"shard {shard} is committed but its pages are still staged"))
                    continue
                found("pages_missing", doc_path, f"shard {shard} has a documents file but no pages file")
                continue
            try:
                rows = self._footer(pages_path).num_rows
            except Exception as exc:  # noqa: BLE001
                found("pages_unreadable", pages_path, f"pages file of shard {shard} does not read "
                      f"({type(exc).__name__})", doc_path)
                continue
            expected = kv.get(PAGES_ROWS_KEY)
            if expected is not None and int(expected) != rows:
                found("pages_count", pages_path, f"pages file of shard {shard} holds {rows} rows, its documents "
                      f"file says {int(expected)}", doc_path)
        committed = self.part_files(DOCUMENTS)
        plans, bad_plans = self._plans()
        for shard, path in sorted(self.part_files(PAGES).items()):
            if shard not in committed and shard not in plans:
                found("orphan_pages", path, f"pages file of shard {shard} without a documents file")
        for path in bad_plans:
            found("plan_malformed", path, "malformed plan")
        for _run_id, path in sorted(self.part_files(RUNS).items()):
            _rows, bad = self._runs_file(path)  # type: ignore[attr-defined]  # reading.py
            if bad is not None:
                found(bad[0], path, bad[1])
        problems += self._verify_rows(repair=repair, stamp=stamp, generations=generations, lease=lease)
        return problems

    def has_output(self) -> bool:
        """Whether anything of a docpipe output is at the root (its tables or `_docpipe/`)."""
        for name in (DOCUMENTS, PAGES, RUNS, META):
            folder = self.path(name)
            if not self.local:
                self.fs.invalidate_cache(folder)
            try:
                if self.fs.isdir(folder):
                    return True
            except OSError:
                continue
        return False

    def verify_settled(self, *, passes: int = 3, pause_s: float = 1.0) -> list["Problem"]:
        """`verify()` of an output a live run is writing: only what is settled. A commit in
        flight shows for a moment as pages still staged, a pages file before its documents
        file, a documents file before its pages, or a file's old version beside its new one;
        so the check is made `passes` times, `pause_s` apart, and only problems found every
        time are reported (a damaged file stays damaged). Pages still staged behind a
        commit are never damage while their run lives (it moves them in next)."""
        problems = [p for p in self.verify() if p.kind != "pages_staged"]
        for _ in range(passes - 1):
            if not problems:
                break
            time.sleep(pause_s)
            again = {(p.kind, p.path) for p in self.verify()}
            problems = [p for p in problems if (p.kind, p.path) in again]
        return problems

    def _verify_rows(self, *, repair: bool, stamp: str, generations: Mapping[str, int],
                     lease: "Lease | None") -> list["Problem"]:
        """Row-level checks over the readable committed documents: shards committed twice,
        older versions of changed files, runs left `running`."""
        problems: list[Problem] = []
        if self.part_files(DOCUMENTS):
            names = ["source_uri", "doc_id", "error_retryable", "attempt", "config_fingerprint", "shard_id",
                     "replaces_doc_id", "status", "error_type"]
            try:
                table = self.open_table(DOCUMENTS).to_table(columns=names)
            except Exception:  # noqa: BLE001 - a damaged file was reported above; a read-only verify stops here
                table = None
            if table is not None:
                rows = list(zip(*(table.column(n).to_pylist() for n in names)))
                latest: dict[tuple[str, str], int] = {}
                for uri, doc_id, _r, attempt, *_rest in rows:
                    latest[(uri, doc_id)] = max(latest.get((uri, doc_id), 0), int(attempt or 1))
                owners: dict[tuple[str, str, str], set[str]] = {}
                for uri, doc_id, retryable, attempt, fp, shard, _r, _s, etype in rows:
                    superseded = etype == TIMEOUT_ERROR and int(attempt or 1) < latest[(uri, doc_id)]
                    if not retryable and not superseded:  # a timeout tried again: the next clean drops it
                        owners.setdefault((uri, doc_id, fp or ""), set()).add(shard)
                losers: set[str] = set()
                for key, shards in owners.items():
                    if len(shards) > 1:  # the newest generation's commit stands
                        keep = max(shards, key=lambda s: (generations.get(s, 0), s))
                        losers |= shards - {keep}
                for shard in sorted(losers):
                    path = self.shard_path(DOCUMENTS, shard)
                    moved = self._quarantine(path, stamp) if repair else None
                    if repair:
                        self._quarantine(self.shard_path(PAGES, shard), stamp)
                    problems.append(Problem("shard_duplicated", full_uri(self.fs, path),
                                            f"shard {shard} (lease generation {generations.get(shard, 0)}) holds "
                                            "documents a newer commit holds too", repaired=repair,
                                            moved_to=None if moved is None else full_uri(self.fs, moved)))
                replaced = {(uri, r) for uri, d, retryable, _a, _fp, shard, r, _s, _t in rows
                            if r is not None and r != d and not retryable and shard not in losers}
                stale = replaced & {(uri, d) for uri, d, *_rest in rows}
                if stale:
                    if repair:
                        self.drop_versions(stale)
                    problems.append(Problem("old_version", self.url, f"{len(stale)} documents rows of files' older "
                                            "versions after their newer version committed", repaired=repair))
        if repair and lease is not None:
            for row in self._running_rows(lease.run_id):
                row = {**row, "status": RunStatus.INTERRUPTED.value, "message": row.get("message") or
                       f"interrupted: the output was taken over by run {lease.run_id}"}
                if row.get("ended_at") is None:
                    row["ended_at"] = _utcnow()
                self.write_run(row)
                problems.append(Problem("run_interrupted", full_uri(self.fs, self.path(RUNS, shard_file_name(
                    str(row["run_id"])))), f"run {row['run_id']} was left 'running'", repaired=True))
        return problems

    def _running_rows(self, current_run: str) -> list[dict[str, Any]]:
        out = []
        for run_id, path in sorted(self.part_files(RUNS).items()):
            if run_id == current_run:
                continue
            try:
                rows = self._read_part(path, RUNS_SCHEMA).to_pylist()
            except Exception:  # noqa: BLE001 - unreadable: reported by verify
                continue
            out += [r for r in rows if r["status"] == RunStatus.RUNNING and r["run_id"] != current_run
                    and len(rows) == 1]
        return out

    def repair(self, lease: "Lease") -> list["Problem"]:
        """`verify(repair=True)` under `lease`, with one warning line naming what was repaired."""
        problems = [p for p in self.verify(repair=True, lease=lease) if p.kind != "run_interrupted"]
        if problems:
            kinds = collections.Counter(p.kind for p in problems)
            log.warning("repaired the output: %s (moved aside under %s)",
                        ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items())),
                        full_uri(self.fs, self.path(META, "quarantine")))
        return problems
