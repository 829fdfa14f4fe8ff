"""Committing a shard (the protocol's step 3) and tidying the output (step 4).

Pages and documents are staged in the lease generation's own folder, the documents file is
put in place exclusively (the commit point), then the pages are moved in; a new owner fences
older generations' staging folders first. Also here: dropping rows a later commit
superseded (retried failures, files' older versions) and cleanup under the lease.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.compaction import COMPACT_MANIFEST_KEEP_S
from pipeline.dataset.lease import LEASE_TTL_S, LeaseLost
from pipeline.dataset.store import (
    COMMIT_KEY,
    DOCUMENTS,
    GENERATION_KEY,
    META,
    PAGES,
    PAGES_ROWS_KEY,
    PARQUET_COMPRESSION,
    RUNS,
    _age_s,
    _fsync_path,
    _is_temp,
    _join,
    _Store,
    _warn_once,
    _with_metadata,
    conform,
    fault_point,
    is_own_file,
    shard_file_name,
    shard_id_of,
)
from pipeline.ledger import TIMEOUT_ERROR
from pipeline.sources import full_uri
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

if TYPE_CHECKING:
    from pipeline.dataset.lease import Lease

log = logging.getLogger("pipeline.dataset")

_STAGE_RE = re.compile(r"^g(?P<gen>\d{12})$")
_LEASELESS_STAGE = "nolease"  # the staging folder of writers without a lease (library use, tests)
_FENCED_RE = re.compile(r"^(?:g\d{12}|nolease)-[0-9a-f]{8}$")  # a staging folder moved to _docpipe/fenced/
_KEPT_KEYS = (GENERATION_KEY, PAGES_ROWS_KEY, COMMIT_KEY)  # footer keys a rewrite of a documents file keeps


@dataclass(frozen=True, slots=True)
class CommitReceipt:
    """What this process committed for a shard: checked again at the end of its run."""

    shard_id: str
    generation: int
    commit_id: str
    pages_rows: int


def _footer_of(data: bytes) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file held in memory ({} when it is not one)."""
    try:
        return dict(pq.read_metadata(pa.BufferReader(data)).metadata or {})
    except (pa.ArrowException, OSError, ValueError):
        return {}


class _CommitOps(_Store):
    """Staging, the fenced commit, publishing pages, superseded rows, cleanup (methods of Dataset)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receipts: dict[str, CommitReceipt] = {}  # shards this object committed, for `check_commits`

    # ---- shards -------------------------------------------------------------------------
    def shard_done(self, shard_id: str) -> bool:
        path = self.shard_path(DOCUMENTS, shard_id)
        if not self.local:
            self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    # Each lease generation stages its files in its own folder, `_docpipe/staging/g<gen>/`,
    # made when the lease is taken; writers never create it again. A new owner first moves
    # older generations' folders away (`_fence_stages`), so a stalled old owner's commit,
    # which links or renames out of its own folder, fails instead of landing (local disks);
    # on object stores the documents file is created with `If-None-Match: *`.
    def _stage_dir(self, generation: int | None) -> str:
        return self.path(META, "staging", _LEASELESS_STAGE if generation is None else f"g{generation:012d}")

    def _make_stage(self, generation: int) -> None:
        if self.local:
            for table in (PAGES, DOCUMENTS):
                self._guard(_join(self._stage_dir(generation), table, "-"))
                os.makedirs(_join(self._stage_dir(generation), table), exist_ok=True)

    def _staged_pages(self, shard_id: str, generation: int | None = None) -> str:
        return _join(self._stage_dir(generation), PAGES, shard_file_name(shard_id))

    def _write_staged(self, path: str, table: pa.Table, *, may_create: bool,
                      metadata: Mapping[bytes, bytes] | None = None) -> None:
        """Write a staged file; locally into a folder that must already exist unless `may_create`
        (a fenced generation's folder is gone, and stays gone)."""
        try:
            self.write_table(path, table, metadata=metadata, make_folder=may_create)
        except FileNotFoundError:
            if may_create:
                raise
            raise LeaseLost(f"the staging folder of this lease generation was fenced off by a newer run "
                            f"({full_uri(self.fs, path.rsplit('/', 1)[0])}); nothing was committed") from None

    def commit_shard(
        self,
        shard_id: str,
        pages: pa.Table,
        documents: pa.Table,
        *,
        lease: "Lease | None" = None,
        supersedes: Iterable[tuple[str, str]] = (),
        replaces: Iterable[tuple[str, str]] = (),
    ) -> bool:
        """Commit a shard: pages and documents staged in this lease generation's folder, the
        documents file put in place exclusively (the commit point), then the pages moved in.

        Returns False when the shard was already committed (by this or another run): nothing
        is written then. The commit point is exclusive (a hard link out of the generation's
        own staging folder locally; `If-None-Match: *` on S3) and carries the lease
        generation, the pages row count and a nonce of this commit (`docpipe.commit_id`) in its
        Parquet metadata, so a documents file never replaces another, a stale commit is told
        from a real one, and a commit the store carried out but answered as failed is
        recognised as this one's (see docs/exactly-once.md). This run's staged pages are
        removed only when the committed file's footer names another lease generation. A
        crash after the commit leaves the pages staged until the next owner moves them in.
        Without a lease (library use, tests) a shard written before is replaced:
        un-committed first (documents file, then its pages).
        `supersedes`: (source_uri, doc_id) of retryable failure rows elsewhere this shard
        replaces; `replaces`: (source_uri, doc_id) of older versions of files this shard
        holds the new version of. Both are dropped from other shards after the commit.
        """
        pages = conform(pages, PAGES_SCHEMA)
        documents = conform(documents, DOCUMENTS_SCHEMA)
        docs_path = self.shard_path(DOCUMENTS, shard_id)
        generation = lease.generation if lease is not None else None
        if lease is not None:
            lease.ensure()
            if self.shard_done(shard_id):
                log.info("shard %s is already committed; nothing written", shard_id)
                self.delete_plan(shard_id)
                return False
        elif self.remove(docs_path):  # un-commit a shard written before, then hide its pages
            self.remove(self.shard_path(PAGES, shard_id))
        stage = self._stage_dir(generation)
        staged_pages = _join(stage, PAGES, shard_file_name(shard_id))
        commit_id = uuid.uuid4().hex  # tells this commit's documents file from any other
        meta = {GENERATION_KEY: str(generation or 0).encode(), PAGES_ROWS_KEY: str(pages.num_rows).encode(),
                COMMIT_KEY: commit_id.encode()}
        fault_point("before_stage")
        self._write_staged(staged_pages, pages, may_create=lease is None)
        if lease is not None:
            lease.ensure()
        fault_point("before_commit")
        if not self._put_documents(shard_id, documents, stage, meta, fenced=lease is not None):
            self._lost_commit(shard_id, generation or 0, staged_pages)
            if lease is not None:
                lease.ensure()  # another run committed it: most likely one that took the output over
            self.delete_plan(shard_id)
            return False
        self.receipts[shard_id] = CommitReceipt(shard_id, generation or 0, commit_id, pages.num_rows)
        fault_point("after_commit")
        if not self._publish_pages(shard_id, generation) and not self.fs.exists(self.shard_path(PAGES, shard_id)):
            # Its staged pages were removed by a newer owner that found no commit: this commit lost
            # the race (object stores, where the stage cannot be fenced). Take it back; it was ours.
            self.remove(docs_path)
            self.receipts.pop(shard_id, None)
            raise LeaseLost(f"shard {shard_id}: a newer run removed this run's staged pages before its commit; "
                            "the commit was taken back")
        self.delete_plan(shard_id)
        keys = set(supersedes)
        if keys:
            self.drop_superseded(keys, keep_shard=shard_id)
        old = set(replaces)
        if old:
            self.drop_versions(old, keep_shard=shard_id)
        return True

    def _lost_commit(self, shard_id: str, generation: int, staged_pages: str) -> None:
        """The shard's documents file is there and is not this commit's: remove this commit's
        staged pages only with proof that another lease generation owns the committed file
        (its footer says so). Another commit of the same generation (a resubmitted shard
        run) stages under the same name: its file is left for it."""
        path = self.shard_path(DOCUMENTS, shard_id)
        try:
            if not self.local:
                self.fs.invalidate_cache(path)
            owner = int((self._footer(path).metadata or {}).get(GENERATION_KEY, b"0") or 0)
        except Exception as exc:  # noqa: BLE001 - gone, unreadable: no proof, so nothing is removed
            raise OSError(f"shard {shard_id}: the store says its documents file exists, but it cannot be read back "
                          f"({type(exc).__name__}); nothing was removed, the next run settles the shard") from None
        if owner != generation:
            log.info("shard %s was committed by lease generation %d; this run's copy is dropped", shard_id, owner)
            self.remove(staged_pages)
        else:
            log.warning("shard %s was committed by another commit of this lease generation (%d); its staged "
                        "pages are left to it", shard_id, generation)

    def check_commits(self, shard_ids: Iterable[str]) -> list[str]:
        """What is missing from the committed shards `shard_ids` (one line each; [] when each is
        whole): its documents file reads, is this process's commit where it made one (the
        nonce in its footer), and its pages file is in `pages/` holding the rows the documents
        file records. Footers only: two small reads a shard."""
        return [problem for shard_id in sorted(set(shard_ids)) if (problem := self._not_whole(shard_id))]

    def _not_whole(self, shard_id: str) -> str | None:
        docs, why = self._shard_footer(DOCUMENTS, shard_id)
        if docs is None:
            return why
        meta = docs.metadata or {}
        receipt = self.receipts.get(shard_id)
        if receipt is not None and meta.get(COMMIT_KEY, b"").decode() != receipt.commit_id:
            return f"shard {shard_id}: the documents file is not this run's commit"
        pages, why = self._shard_footer(PAGES, shard_id)
        if pages is None:
            return why
        expected = meta.get(PAGES_ROWS_KEY)
        if expected is not None and int(expected) != pages.num_rows:
            return (f"shard {shard_id}: the pages file holds {pages.num_rows} rows, its documents file says "
                    f"{int(expected)}")
        return None

    def _shard_footer(self, table: str, shard_id: str) -> tuple[pq.FileMetaData | None, str]:
        """(footer, "") of a shard's file, or (None, why it cannot be read)."""
        path = self.shard_path(table, shard_id)
        if not self.local:
            self.fs.invalidate_cache(path)
        try:
            return self._footer(path), ""
        except FileNotFoundError:
            return None, f"shard {shard_id}: no {table} file"
        except Exception as exc:  # noqa: BLE001 - truncated, zeroed, not Parquet
            return None, f"shard {shard_id}: the {table} file does not read ({type(exc).__name__})"

    def _put_documents(self, shard_id: str, documents: pa.Table, stage: str, meta: Mapping[bytes, bytes],
                       *, fenced: bool) -> bool:
        """The commit point: the documents file appears whole, only if none is there. False if one
        was (and it is not this commit's own: see `create_exclusive`)."""
        final = self.shard_path(DOCUMENTS, shard_id)
        if not self.local:
            buffer = pa.BufferOutputStream()
            pq.write_table(_with_metadata(documents, meta), buffer, compression=PARQUET_COMPRESSION)
            if not fenced:
                self.write_bytes(final, buffer.getvalue().to_pybytes())
                return True
            commit_id = meta[COMMIT_KEY]
            return self.create_exclusive(final, buffer.getvalue().to_pybytes(),
                                         mine=lambda raw: _footer_of(raw).get(COMMIT_KEY) == commit_id)
        staged = _join(stage, DOCUMENTS, shard_file_name(shard_id))
        self._write_staged(staged, documents, may_create=not fenced, metadata=meta)
        self._guard(final)
        os.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            os.link(staged, final)  # fails if the stage folder was fenced away, or a commit is there
        except FileExistsError:
            os.remove(staged)
            return False
        except FileNotFoundError:
            raise LeaseLost(f"shard {shard_id}: this run's staging folder was fenced off by a newer run; "
                            "nothing was committed") from None
        _fsync_path(final.rsplit("/", 1)[0], directory=True)
        try:
            os.remove(staged)
        except FileNotFoundError:
            pass
        return True

    def _publish_pages(self, shard_id: str, generation: int | None = None, stage: str | None = None) -> bool:
        """Move a committed shard's staged pages file to its final name (whole, or not yet).
        False when the staged file is not there (a newer owner moved it in already)."""
        staged = _join(stage, shard_file_name(shard_id)) if stage else self._staged_pages(shard_id, generation)
        final = self.shard_path(PAGES, shard_id)
        try:
            if self.local:
                self._guard(staged)
                self._guard(final)
                os.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                os.replace(staged, final)
                _fsync_path(final.rsplit("/", 1)[0], directory=True)
            else:  # a server-side copy makes the final object appear whole; then the staged one goes
                self.fs.copy(staged, final)
                self.remove(staged)
        except FileNotFoundError:
            log.info("shard %s: its staged pages were moved in by a newer run", shard_id)
            return False
        return True

    def drop_superseded(self, keys: set[tuple[str, str]], *, keep_shard: str | None = None) -> int:
        """Remove the rows of `keys` that a retry supersedes (retryable failures, and final
        `document_timeout` rows tried again on request) from committed shards other than
        `keep_shard`: a timed-out row's pages go first (pages file rewritten, then the
        documents file with its new pages row count). Returns documents rows removed."""
        removed = 0
        for shard, path in sorted(self.part_files(DOCUMENTS).items()):
            if shard == keep_shard:
                continue
            table = self._read_part(path, DOCUMENTS_SCHEMA)
            uris, ids = table.column("source_uri").to_pylist(), table.column("doc_id").to_pylist()
            retryable = table.column("error_retryable").to_pylist()
            etypes = table.column("error_type").to_pylist()
            keep = [not ((bool(r) or t == TIMEOUT_ERROR) and (u, d) in keys)
                    for u, d, r, t in zip(uris, ids, retryable, etypes)]
            if all(keep):
                continue
            removed += keep.count(False)
            meta = {k: v for k, v in (self._footer(path).metadata or {}).items() if k in _KEPT_KEYS}
            gone = {(u, d) for u, d, k in zip(uris, ids, keep) if not k}
            pages_path = self.shard_path(PAGES, shard)
            if self.fs.exists(pages_path):
                pages = self._read_part(pages_path, PAGES_SCHEMA)
                keep_pages = [(u, d) not in gone for u, d in zip(pages.column("source_uri").to_pylist(),
                                                                  pages.column("doc_id").to_pylist())]
                if not all(keep_pages):  # a timed-out row's pages (retryable rows have none)
                    pages = conform(pages.filter(pa.array(keep_pages, pa.bool_())), PAGES_SCHEMA)
                    self.write_table(pages_path, pages)
                    meta[PAGES_ROWS_KEY] = str(pages.num_rows).encode()
            self.write_table(path, conform(table.filter(pa.array(keep)), DOCUMENTS_SCHEMA), metadata=meta)
            log.info("dropped %d superseded rows from shard %s", keep.count(False), shard)
        return removed

    def drop_versions(self, keys: set[tuple[str, str]], *, keep_shard: str | None = None) -> int:
        """Remove the rows of (source_uri, doc_id) `keys` (a file's older versions) from
        committed shards other than `keep_shard`: the pages file is rewritten first, then
        the documents file (with its new pages row count), so a crash in between is a
        count mismatch that the next run's repair sees. Returns documents rows removed."""
        removed = 0
        for shard, path in sorted(self.part_files(DOCUMENTS).items()):
            if shard == keep_shard:
                continue
            docs = self._read_part(path, DOCUMENTS_SCHEMA)
            pairs = list(zip(docs.column("source_uri").to_pylist(), docs.column("doc_id").to_pylist()))
            drop = [p in keys for p in pairs]
            if not any(drop):
                continue
            pages_path = self.shard_path(PAGES, shard)
            pages = self._read_part(pages_path, PAGES_SCHEMA) if self.fs.exists(pages_path) else None
            meta = dict(self._footer(path).metadata or {})
            if pages is not None:
                keep_pages = [(u, d) not in keys for u, d in zip(pages.column("source_uri").to_pylist(),
                                                                  pages.column("doc_id").to_pylist())]
                pages = conform(pages.filter(pa.array(keep_pages, pa.bool_())), PAGES_SCHEMA)
                self.write_table(pages_path, pages)
                meta[PAGES_ROWS_KEY] = str(pages.num_rows).encode()
            kept = conform(docs.filter(pa.array([not d for d in drop], pa.bool_())), DOCUMENTS_SCHEMA)
            self.write_table(path, kept, metadata={k: v for k, v in meta.items()
                                                   if k in _KEPT_KEYS})
            removed += sum(drop)
            log.info("dropped %d rows of older file versions from shard %s", sum(drop), shard)
        return removed

    def _repair_superseded(self) -> None:
        """Finish a retry's commit that a crash cut short: drop superseded failure rows."""
        parts = self.part_files(DOCUMENTS)
        if len(parts) < 2:
            return
        table = self.open_table(DOCUMENTS).to_table(
            columns=["source_uri", "doc_id", "error_retryable", "attempt", "shard_id", "error_type"]
        )
        latest: dict[tuple[str, str], int] = {}
        rows = list(zip(*(table.column(c).to_pylist() for c in table.column_names)))
        for uri, doc_id, _retryable, attempt, _shard, _t in rows:
            key = (uri, doc_id)
            latest[key] = max(latest.get(key, 0), int(attempt or 1))
        stale = {(u, d) for u, d, r, a, _s, t in rows if (r or t == TIMEOUT_ERROR) and int(a or 1) < latest[(u, d)]}
        if stale:
            keep: dict[tuple[str, str], str] = {}
            for uri, doc_id, _r, attempt, shard, _t in rows:
                if (uri, doc_id) in stale and int(attempt or 1) == latest[(uri, doc_id)]:
                    keep[(uri, doc_id)] = shard
            for key, shard in keep.items():
                self.drop_superseded({key}, keep_shard=shard)

    # ---- cleanup ------------------------------------------------------------------------
    def clean(self, *, current_fingerprint: str | None = None, temp_older_than_s: float = LEASE_TTL_S,
              generation: int | None = None) -> list[str]:
        """Tidy the output; call only while holding its lease (of `generation`).

        Fences the staging folders of older lease generations (committed shards' staged
        pages are moved in, the rest removed); removes plans of committed shards; plans
        made under other settings than `current_fingerprint` (with their pages file); pages
        files with neither a documents file nor a plan; temp files older than
        `temp_older_than_s`; and rows of retryable failures that a later row of the same
        document superseded.
        """
        self._finish_compactions(keep_s=COMPACT_MANIFEST_KEEP_S)  # one a crash cut short
        removed: list[str] = self._fence_stages(generation)
        committed = set(self.part_files(DOCUMENTS))
        plans = self.plans()
        for shard_id, plan in plans.items():
            stale = current_fingerprint is not None and plan.fingerprint != current_fingerprint
            if shard_id in committed or stale:
                self.delete_plan(shard_id)
                removed.append(full_uri(self.fs, self._plan_path(shard_id)))
        live_plans = {s for s, p in plans.items() if s not in committed and not (
            current_fingerprint is not None and p.fingerprint != current_fingerprint)}
        now = time.time()
        for table in (PAGES, DOCUMENTS, RUNS, f"{META}/plans", f"{META}/lease", META):
            for entry in self._listing(self.path(table)):
                path = entry["name"]
                shard = shard_id_of(path) if table == PAGES else None
                orphan = shard is not None and shard not in committed and shard not in live_plans
                if _is_temp(path):
                    age = _age_s(entry, now)
                    if age is None or age < temp_older_than_s:
                        continue
                elif not orphan:
                    continue
                if self.remove(path):
                    removed.append(full_uri(self.fs, path))
                    log.info("removed stale output file %s", full_uri(self.fs, path))
        self._repair_superseded()
        return removed

    def _fence_stages(self, keep_generation: int | None) -> list[str]:
        """Take the staging folders of older generations (and of lease-less writers) away
        from their writers, then settle what they held: a committed shard's staged pages
        are moved in (roll forward), anything else is removed. Locally the folder is first
        renamed to `_docpipe/fenced/`, after which its old owner can neither stage nor
        commit from it (its link/rename out of the folder fails); the commits are listed
        only after that rename, so none is missed.

        Only docpipe's own names are touched: staging folders `g<generation>` / `nolease`,
        fenced folders `<that>-<8 hex>`, part files and docpipe's temp files in them. Anything
        else found there (a link, a folder or file docpipe did not make) is left alone, and
        a fenced folder is removed only once it is empty (never recursively)."""
        base = self.path(META, "staging")
        removed: list[str] = []
        folders: list[str] = []
        for name in self._subfolders(base):
            match = _STAGE_RE.match(name)
            if not match and name not in (_LEASELESS_STAGE, PAGES):
                _warn_once(f"foreign:{base}/{name}", "left %s alone: not a folder docpipe made",
                           full_uri(self.fs, _join(base, name)))
                continue
            if match and keep_generation is not None and int(match["gen"]) >= keep_generation:
                continue  # this owner's own folder (or, if this owner lost, a newer one's)
            folder = _join(base, name)
            if self.local and name != PAGES:
                fenced = self.path(META, "fenced", f"{name}-{uuid.uuid4().hex[:8]}")
                self._guard(folder)
                self._guard(fenced)
                os.makedirs(fenced.rsplit("/", 1)[0], exist_ok=True)
                try:
                    os.rename(folder, fenced)
                except FileNotFoundError:
                    continue
                folder = fenced
            folders.append(folder)
        fenced_base = self.path(META, "fenced")
        folders += [_join(fenced_base, n) for n in self._subfolders(fenced_base)
                    if _FENCED_RE.match(n) and _join(fenced_base, n) not in folders]
        if not folders:
            return removed
        committed = set(self.part_files(DOCUMENTS))  # listed after the fence
        present = set(self.part_files(PAGES))
        for folder in folders:
            legacy = folder.rstrip("/").endswith(f"staging/{PAGES}")
            pages_dir = folder if legacy else _join(folder, PAGES)
            for entry in self._listing(pages_dir):
                if not is_own_file(entry["name"]):
                    continue
                shard = shard_id_of(entry["name"])
                if shard is not None and shard in committed and shard not in present:
                    if self._publish_pages(shard, stage=pages_dir):
                        log.info("finished the commit of shard %s (its pages were still staged)", shard)
                        present.add(shard)
                        continue
                if self.remove(entry["name"]):
                    removed.append(full_uri(self.fs, entry["name"]))
            for entry in [] if legacy else self._listing(_join(folder, DOCUMENTS)):
                if is_own_file(entry["name"]):
                    self.remove(entry["name"])  # a committed one was linked into documents/ already
            if not legacy and self.local:
                self._remove_empty_folder(folder)
        return removed

    def _remove_empty_folder(self, folder: str) -> None:
        """Remove a fenced staging folder and its two table folders, each only if empty (a
        file docpipe did not make keeps it, with one warning). Object stores have no folders."""
        for path in (_join(folder, PAGES), _join(folder, DOCUMENTS), folder):
            try:
                self._guard(_join(path, "-"))
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError:
                _warn_once(f"kept:{folder}", "kept %s: it holds files docpipe did not make", full_uri(self.fs, folder))
                return
