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

`sink` only turns rows into Arrow tables; this module decides where and when they land.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.records import KnownFile
from pipeline.shard.ledger import POLICY
from pipeline.sources import full_uri, is_local, resolve
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, RUNS_SCHEMA, SCHEMAS

log = logging.getLogger(__name__)

PAGES = "pages"
DOCUMENTS = "documents"
RUNS = "runs"
META = "_docpipe"
PARQUET_COMPRESSION = "zstd"

LEASE_TTL_S = float(os.environ.get("DOCPIPE_LEASE_TTL_S", "60"))  # a lease not refreshed for this long has lapsed
HEARTBEAT_S = min(10.0, LEASE_TTL_S / 4)  # how often the owner refreshes it
COMPACT_TARGET_ROWS = 50_000  # compaction: pages rows per merged file at most
COMPACT_GRACE_S = 10.0  # between the switch and removing the replaced files
COMPACT_MANIFEST_KEEP_S = 3600.0  # a manifest outlives its replaced files this long

_PART_RE = re.compile(r"^part-(?P<shard>[^/\\]+)\.parquet$")
_TEMP_MARK = ".tmp-"
_GEN_RE = re.compile(r"^(?P<gen>\d{12})\.json$")
_STAGE_RE = re.compile(r"^g(?P<gen>\d{12})$")
GENERATION_KEY = b"docpipe.lease_generation"  # documents files: the lease generation that committed it
PAGES_ROWS_KEY = b"docpipe.pages_rows"  # documents files: rows its shard's pages file holds


class OutputBusy(RuntimeError):
    """Another live run owns the output."""


class LeaseLost(RuntimeError):
    """This run no longer owns the output (a newer run took it over): nothing more is committed."""


class OutputNotWritable(RuntimeError):
    """The output cannot be written (read-only, missing permission, a file in the way)."""


# ---------------------------------------------------------------------------------------
# Paths and files
# ---------------------------------------------------------------------------------------


def shard_file_name(shard_id: str) -> str:
    """File name of a shard's part file (the same in both tables)."""
    if not shard_id or shard_id.startswith(".") or any(c in shard_id for c in "/\\") or shard_id != shard_id.strip():
        raise ValueError(f"invalid shard id {shard_id!r}: non-empty, no slashes, no leading dot or spaces")
    return f"part-{shard_id}.parquet"


def shard_id_of(name: str) -> str | None:
    """Shard id from a part file name (basename or path); None for anything else."""
    match = _PART_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return match["shard"] if match else None


def _is_temp(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and _TEMP_MARK in base


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open folders; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _age_s(info: Mapping[str, Any], now: float) -> float | None:
    """Seconds since the file was last written, from its listing entry; None when unknown."""
    stamp = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    return None if not isinstance(stamp, (int, float)) else now - float(stamp)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _boot_id() -> str | None:
    """This kernel's boot id (Linux); two containers on one host share it, two hosts never do."""
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    """The inode of this process's PID namespace: pids mean the same thing only within one."""
    try:
        return f"pid:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): tells a reused pid from its first owner."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # fields[0] is field 3 (state)


# Set by tests and bench/faults.py only: `DOCPIPE_FAULT_POINT=<name>` makes the process stop
# itself (SIGSTOP) when it reaches that point, after writing `<name>` to DOCPIPE_FAULT_MARKER
# (a file the driver polls), so a stall can be placed exactly. No effect when unset.
_FAULT_ENV = "DOCPIPE_FAULT_POINT"


def fault_point(name: str) -> None:
    if os.environ.get(_FAULT_ENV) != name:
        return
    os.environ.pop(_FAULT_ENV, None)  # once per process
    marker = os.environ.get("DOCPIPE_FAULT_MARKER")
    if marker:
        with open(marker, "w") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


# ---------------------------------------------------------------------------------------
# Lease records
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One lease generation as stored in `_docpipe/lease/<generation>.json`."""

    generation: int
    run_id: str
    host: str
    pid: int
    acquired_at: float  # unix seconds
    heartbeat_at: float
    ttl_s: float
    released: bool = False
    boot_id: str | None = None  # the owner's kernel boot
    pid_ns: str | None = None  # the owner's PID namespace
    start_time: str | None = None  # the owner process's start time (clock ticks after boot)

    def expired(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - self.heartbeat_at > self.ttl_s

    def owner_gone(self) -> bool:
        """The owner's process no longer exists, as far as this process can really tell.

        Only a checker in the owner's kernel boot and PID namespace can see the owner's pid
        (a container with its own PID namespace, or another machine with the same host name,
        cannot): anywhere else, or for a record that does not say, the TTL alone decides.
        A live pid that started at another time than the owner is a reused pid: gone.
        """
        if self.host != _host() or not self.boot_id or not self.pid_ns:
            return False
        if self.boot_id != _boot_id() or self.pid_ns != _pid_namespace():
            return False
        if not _pid_alive(self.pid):
            return True
        return self.start_time is not None and _start_time(self.pid) not in (None, self.start_time)

    def lapsed(self) -> bool:
        return self.released or self.expired() or self.owner_gone()

    def describe(self) -> str:
        age = time.time() - self.heartbeat_at
        return f"run {self.run_id} (pid {self.pid} on {self.host}, last heartbeat {age:.0f} s ago)"


class _LeaseRecord(BaseModel):
    """The stored form of a lease, validated: anything else is a malformed (stale) lease."""

    model_config = ConfigDict(extra="ignore")
    generation: int = Field(ge=1)
    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    ttl_s: float = Field(gt=0)
    released: bool = False
    boot_id: str | None = None
    pid_ns: str | None = None
    start_time: str | None = None


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    shard_id: str
    run_id: str
    fingerprint: str
    shard: dict[str, Any]
    created_at: float
    attempts: dict[str, int] = Field(default_factory=dict)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def _new_lease(generation: int, run_id: str, ttl_s: float) -> LeaseInfo:
    now = time.time()
    pid = os.getpid()
    return LeaseInfo(generation, run_id, _host(), pid, now, now, ttl_s, False, _boot_id(), _pid_namespace(),
                     _start_time(pid))


# ---------------------------------------------------------------------------------------
# What the output holds
# ---------------------------------------------------------------------------------------


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
    # source_uri -> doc_id of its done row (the version of the file the output holds)
    versions: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


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


@dataclass(frozen=True, slots=True)
class PlanRecord:
    """A shard's composition, written before any of its files."""

    shard_id: str
    run_id: str
    fingerprint: str
    shard: dict[str, Any]  # Shard.to_dict()
    created_at: float
    attempts: dict[str, int] = field(default_factory=dict)  # source_uri -> attempt number in this shard


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


class Dataset:
    """An output root and the operations of its commit protocol."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = resolve(url, self.storage_options)
        self.local = is_local(self.fs)

    # ---- files -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def shard_path(self, table: str, shard_id: str) -> str:
        return self.path(table, shard_file_name(shard_id))

    def _listing(self, folder: str) -> list[dict[str, Any]]:
        """Files directly in `folder` (with details); empty when the folder does not exist."""
        if not self.local:
            self.fs.invalidate_cache(folder)  # other processes write here: never trust a cached listing
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return [e for e in entries if e.get("type") == "file" and not e["name"].endswith("/")]

    def part_files(self, table: str) -> dict[str, str]:
        """shard id -> path of the part files of `table` (temp files excluded)."""
        out: dict[str, str] = {}
        for entry in self._listing(self.path(table)):
            shard = shard_id_of(entry["name"])
            if shard is not None:
                out[shard] = entry["name"]
        return out

    def arrow_fs(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem() if self.local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def write_bytes(self, path: str, data: bytes, *, make_folder: bool = True) -> None:
        """Write `data` under `path` atomically (temp + rename locally, one PUT elsewhere).
        `make_folder=False`: locally, fail (FileNotFoundError) when the folder is not there."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        folder, name = path.rsplit("/", 1)
        if make_folder:
            os.makedirs(folder, exist_ok=True)
        temp = f"{folder}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(temp, "wb") as fh:
                fh.write(data)
            _fsync_path(temp)
            os.replace(temp, path)
        except BaseException:
            try:
                os.remove(temp)
            except FileNotFoundError:
                pass
            raise
        _fsync_path(folder, directory=True)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if nothing is there; False when something was.

        Locally a temp file is hard-linked to the final name (link fails if it exists, and
        the file appears with its content); on S3 the PUT carries `If-None-Match: *`.
        Other stores fall back to check-then-write (documented as best effort).
        """
        if self.local:
            folder, name = path.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            temp = f"{folder}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}"
            with open(temp, "wb") as fh:
                fh.write(data)
            try:
                os.link(temp, path)
                _fsync_path(folder, directory=True)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(temp)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "s3" in protocols:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def _read_small(self, path: str) -> bytes:
        """All bytes of a small record in one GET. (Opening a file on S3 pins its ETag: a
        record rewritten between the open and the read, as a lease is by its heartbeat,
        would fail with FileExpired.)"""
        if not self.local:
            self.fs.invalidate_cache(path)
        return self.fs.cat_file(path)

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._read_small(path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            log.warning("unreadable metadata file %s", full_uri(self.fs, path))
            return None

    def remove(self, path: str) -> bool:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def write_table(self, path: str, table: pa.Table, metadata: Mapping[bytes, bytes] | None = None, *,
                    make_folder: bool = True) -> None:
        buffer = pa.BufferOutputStream()
        pq.write_table(_with_metadata(table, metadata), buffer, compression=PARQUET_COMPRESSION)
        self.write_bytes(path, buffer.getvalue().to_pybytes(), make_folder=make_folder)

    # ---- set-up checks ------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write and remove a probe file under the output; OutputNotWritable if that fails."""
        where = full_uri(self.fs, self.root)
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise OutputNotWritable(f"output {where} is a file, not a folder")
        probe = self.path(META, f".probe{_TEMP_MARK}{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"docpipe write probe\n")
            self.remove(probe)
        except (OSError, PermissionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise OutputNotWritable(f"output {where} is not writable: {reason}") from None

    # ---- lease -------------------------------------------------------------------------
    def _lease_dir(self) -> str:
        return self.path(META, "lease")

    def _lease_path(self, generation: int) -> str:
        return _join(self._lease_dir(), f"{generation:012d}.json")

    def lease_generations(self) -> list[int]:
        gens = []
        for entry in self._listing(self._lease_dir()):
            match = _GEN_RE.match(entry["name"].rsplit("/", 1)[-1])
            if match:
                gens.append(int(match["gen"]))
        return sorted(gens)

    def read_lease(self, generation: int) -> LeaseInfo | None:
        """The lease record of `generation`; None when it is missing or malformed."""
        return self._lease_record(generation)[0]

    def _lease_record(self, generation: int) -> tuple[LeaseInfo | None, bool]:
        """(record, malformed): a record that is not valid JSON of the lease's shape is
        malformed, which counts as a stale lease (one warning, never a traceback)."""
        path = self._lease_path(generation)
        try:
            raw = self._read_small(path)
        except FileNotFoundError:
            return None, False
        try:
            record = _LeaseRecord.model_validate_json(raw)
        except ValidationError as exc:
            _warn_once(path, "the output's lease record %s is malformed (%s); treating it as stale",
                       full_uri(self.fs, path), exc.errors()[0].get("msg", "invalid") if exc.errors() else "invalid")
            return None, True
        return LeaseInfo(**record.model_dump()), False

    def current_lease(self) -> LeaseInfo | None:
        gens = self.lease_generations()
        return self.read_lease(gens[-1]) if gens else None

    def acquire(
        self, run_id: str, *, wait_s: float = 0.0, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S
    ) -> "Lease":
        """Own the output for `run_id`; OutputBusy when a live run holds it past `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            gens = self.lease_generations()
            current, malformed = self._lease_record(gens[-1]) if gens else (None, False)
            if gens and current is None and not malformed:
                continue  # listed, then gone (pruned by a new owner): look again
            lapsed = current is None or current.lapsed()
            if lapsed:
                generation = (gens[-1] + 1) if gens else 1
                info = _new_lease(generation, run_id, ttl_s)
                if self.create_exclusive(self._lease_path(generation), _lease_bytes(info)):
                    if current is not None and not current.released:
                        log.warning("took over the output from %s, whose lease had lapsed", current.describe())
                    self._prune_leases(generation)
                    self._make_stage(generation)
                    return Lease(self, info, heartbeat_s=heartbeat_s)
                continue  # someone else took this generation first: look again
            if time.monotonic() >= deadline:
                holder = current.describe() if current else "another run"
                raise OutputBusy(f"output {full_uri(self.fs, self.root)} is in use by {holder}")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _lease_entry(self, generation: int) -> dict[str, Any] | None:
        path = self._lease_path(generation)
        for entry in self._listing(self._lease_dir()):
            if entry["name"].rstrip("/").endswith(path.rsplit("/", 1)[-1]):
                return entry
        return None

    def _prune_leases(self, keep_from: int) -> None:
        for gen in self.lease_generations():
            if gen < keep_from - 2:  # a few old generations stay for the record
                self.remove(self._lease_path(gen))

    # ---- plans --------------------------------------------------------------------------
    def _plan_path(self, shard_id: str) -> str:
        return self.path(META, "plans", f"{shard_id}.json")

    def write_plan(self, plan: PlanRecord) -> None:
        fault_point("before_plan")
        self.write_bytes(self._plan_path(plan.shard_id), json.dumps(asdict(plan), sort_keys=True).encode())

    def plans(self) -> dict[str, PlanRecord]:
        """Valid plans by shard id (a malformed one is left out, with one warning; `repair`
        moves it to the quarantine)."""
        return self._plans()[0]

    def _plans(self) -> tuple[dict[str, PlanRecord], list[str]]:
        from pipeline.planning import Shard

        out: dict[str, PlanRecord] = {}
        bad: list[str] = []
        for entry in self._listing(self.path(META, "plans")):
            name = entry["name"].rsplit("/", 1)[-1]
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                model = _PlanModel.model_validate_json(self._read_small(entry["name"]))
                Shard.from_dict(model.shard)  # the shard itself must read back
                plan = PlanRecord(**model.model_dump())
            except FileNotFoundError:
                continue
            except (ValidationError, ValueError, KeyError, TypeError) as exc:
                _warn_once(entry["name"], "plan %s is malformed (%s); it is not replayed",
                           full_uri(self.fs, entry["name"]), type(exc).__name__)
                bad.append(entry["name"])
                continue
            out[plan.shard_id] = plan
        return out, bad

    def delete_plan(self, shard_id: str) -> None:
        self.remove(self._plan_path(shard_id))

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
        return self.path(META, "staging", "nolease" if generation is None else f"g{generation:012d}")

    def _make_stage(self, generation: int) -> None:
        if self.local:
            for table in (PAGES, DOCUMENTS):
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
        generation and the pages row count in its Parquet metadata, so a documents file
        never replaces another and a stale commit is told from a real one (see
        docs/exactly-once.md). A crash after the commit leaves the pages staged until the
        next owner moves them in. Without a lease (library use, tests) a shard written
        before is replaced: un-committed first (documents file, then its pages).
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
        meta = {GENERATION_KEY: str(generation or 0).encode(), PAGES_ROWS_KEY: str(pages.num_rows).encode()}
        fault_point("before_stage")
        self._write_staged(_join(stage, PAGES, shard_file_name(shard_id)), pages, may_create=lease is None)
        if lease is not None:
            lease.ensure()
        fault_point("before_commit")
        if not self._put_documents(shard_id, documents, stage, meta, fenced=lease is not None):
            self.remove(_join(stage, PAGES, shard_file_name(shard_id)))
            if lease is not None:
                lease.ensure()  # another run committed it: most likely one that took the output over
            self.delete_plan(shard_id)
            return False
        fault_point("after_commit")
        if not self._publish_pages(shard_id, generation) and not self.fs.exists(self.shard_path(PAGES, shard_id)):
            # Its staged pages were removed by a newer owner that found no commit: this commit lost
            # the race (object stores, where the stage cannot be fenced). Take it back; it was ours.
            self.remove(docs_path)
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

    def _put_documents(self, shard_id: str, documents: pa.Table, stage: str, meta: Mapping[bytes, bytes],
                       *, fenced: bool) -> bool:
        """The commit point: the documents file appears whole, only if none is there. False if one was."""
        final = self.shard_path(DOCUMENTS, shard_id)
        if not self.local:
            buffer = pa.BufferOutputStream()
            pq.write_table(_with_metadata(documents, meta), buffer, compression=PARQUET_COMPRESSION)
            if not fenced:
                self.write_bytes(final, buffer.getvalue().to_pybytes())
                return True
            return self.create_exclusive(final, buffer.getvalue().to_pybytes())
        staged = _join(stage, DOCUMENTS, shard_file_name(shard_id))
        self._write_staged(staged, documents, may_create=not fenced, metadata=meta)
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
        """Remove retryable-failure rows of `keys` from committed shards other than
        `keep_shard` (their documents file is rewritten whole). Returns rows removed."""
        removed = 0
        for shard, path in sorted(self.part_files(DOCUMENTS).items()):
            if shard == keep_shard:
                continue
            table = self._read_part(path, DOCUMENTS_SCHEMA)
            uris, ids = table.column("source_uri").to_pylist(), table.column("doc_id").to_pylist()
            retryable = table.column("error_retryable").to_pylist()
            keep = [not (bool(r) and (u, d) in keys) for u, d, r in zip(uris, ids, retryable)]
            if all(keep):
                continue
            removed += keep.count(False)
            meta = {k: v for k, v in (self._footer(path).metadata or {}).items() if k in (GENERATION_KEY, PAGES_ROWS_KEY)}
            self.write_table(path, conform(table.filter(pa.array(keep)), DOCUMENTS_SCHEMA), metadata=meta)
            log.info("dropped %d superseded retryable rows from shard %s", keep.count(False), shard)
        return removed

    def _read_part(self, path: str, schema: pa.Schema) -> pa.Table:
        return ds.dataset([path], schema=schema, format="parquet", filesystem=self.arrow_fs()).to_table()

    # ---- reading back --------------------------------------------------------------------
    def open_table(self, table: str) -> ds.Dataset:
        """The committed files of one table as a pyarrow dataset (uncommitted pages never show)."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
        paths = self.committed_paths(table)  # hides shards a finished compaction replaced
        return ds.dataset(paths, schema=SCHEMAS[table], format="parquet", filesystem=self.arrow_fs())

    def read_state(
        self, *, fingerprint: str | None = None, reprocess: bool = False, max_attempts: int | None = None
    ) -> DoneState:
        """Committed shards and which documents are done (see the module docstring, step 5)."""
        parts = self.part_files(DOCUMENTS)
        if not parts:
            return DoneState()
        max_attempts = POLICY.runs if max_attempts is None else max_attempts  # the ledger's budget of runs
        names = ["source_uri", "doc_id", "status", "size_bytes", "source_version", "media_type",
                 "error_retryable", "attempt", "config_fingerprint"]
        table = self.open_table(DOCUMENTS).to_table(columns=names)
        cols = {n: table.column(n).to_pylist() for n in names}
        done: set[tuple[str, str]] = set()
        retry: dict[tuple[str, str], int] = {}
        processed: dict[str, str] = {}
        known: dict[str, KnownFile] = {}
        versions: dict[str, str] = {}
        rows = zip(*(cols[n] for n in names))
        for uri, doc_id, status, size, version, media, retryable, attempt, fp in sorted(rows, key=_row_order):
            key = (uri, doc_id)
            if reprocess and fingerprint is not None and fp != fingerprint:
                continue  # written with other settings: this run does it again
            attempts = int(attempt or 1)
            if retryable and attempts < max_attempts:
                if key not in done:
                    retry[key] = max(retry.get(key, 0), attempts)
                if doc_id:
                    versions.setdefault(uri, doc_id)  # a changed file's new version replaces this row too
                continue
            done.add(key)
            retry.pop(key, None)
            if doc_id:
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
        )

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

    def _subfolders(self, folder: str) -> list[str]:
        if not self.local:
            self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def _fence_stages(self, keep_generation: int | None) -> list[str]:
        """Take the staging folders of older generations (and of lease-less writers) away
        from their writers, then settle what they held: a committed shard's staged pages
        are moved in (roll forward), anything else is removed. Locally the folder is first
        renamed to `_docpipe/fenced/`, after which its old owner can neither stage nor
        commit from it (its link/rename out of the folder fails); the commits are listed
        only after that rename, so none is missed."""
        base = self.path(META, "staging")
        removed: list[str] = []
        folders: list[str] = []
        for name in self._subfolders(base):
            match = _STAGE_RE.match(name)
            if match and keep_generation is not None and int(match["gen"]) >= keep_generation:
                continue  # this owner's own folder (or, if this owner lost, a newer one's)
            folder = _join(base, name)
            if self.local and name != PAGES:
                fenced = self.path(META, "fenced", f"{name}-{uuid.uuid4().hex[:8]}")
                os.makedirs(fenced.rsplit("/", 1)[0], exist_ok=True)
                try:
                    os.rename(folder, fenced)
                except FileNotFoundError:
                    continue
                folder = fenced
            folders.append(folder)
        folders += [_join(self.path(META, "fenced"), n) for n in self._subfolders(self.path(META, "fenced"))
                    if _join(self.path(META, "fenced"), n) not in folders]
        if not folders:
            return removed
        committed = set(self.part_files(DOCUMENTS))  # listed after the fence
        present = set(self.part_files(PAGES))
        for folder in folders:
            legacy = folder.rstrip("/").endswith(f"staging/{PAGES}")
            pages_dir = folder if legacy else _join(folder, PAGES)
            for entry in self._listing(pages_dir):
                shard = shard_id_of(entry["name"])
                if shard is not None and shard in committed and shard not in present:
                    if self._publish_pages(shard, stage=pages_dir):
                        log.info("finished the commit of shard %s (its pages were still staged)", shard)
                        present.add(shard)
                        continue
                if self.remove(entry["name"]):
                    removed.append(full_uri(self.fs, entry["name"]))
            for entry in [] if legacy else self._listing(_join(folder, DOCUMENTS)):
                self.remove(entry["name"])  # a committed one was linked into documents/ already
            if not legacy:
                try:
                    self.fs.rm(folder, recursive=True)
                except FileNotFoundError:
                    pass
        return removed

    # ---- verification and repair -----------------------------------------------------
    def _quarantine(self, path: str, stamp: str) -> str:
        """Move `path` under `_docpipe/quarantine/<stamp>/` (never deleted); returns the new path."""
        rel = path[len(self.root.rstrip("/")) + 1:] if path.startswith(self.root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
        target = self.path(META, "quarantine", stamp, rel)
        if self.local:
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

    def _footer(self, path: str) -> pq.FileMetaData:
        return pq.read_metadata(path, filesystem=self.arrow_fs())

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
        for run_id, path in sorted(self.part_files(RUNS).items()):
            try:
                self._footer(path)
            except Exception as exc:  # noqa: BLE001
                found("runs_unreadable", path, f"runs file of run {run_id} does not read ({type(exc).__name__})")
        problems += self._verify_rows(repair=repair, stamp=stamp, generations=generations, lease=lease)
        return problems

    def _verify_rows(self, *, repair: bool, stamp: str, generations: Mapping[str, int],
                     lease: "Lease | None") -> list["Problem"]:
        """Row-level checks over the readable committed documents: shards committed twice,
        older versions of changed files, runs left `running`."""
        problems: list[Problem] = []
        if self.part_files(DOCUMENTS):
            names = ["source_uri", "doc_id", "error_retryable", "attempt", "config_fingerprint", "shard_id",
                     "replaces_doc_id", "status"]
            try:
                table = self.open_table(DOCUMENTS).to_table(columns=names)
            except Exception:  # noqa: BLE001 - a damaged file was reported above; a read-only verify stops here
                table = None
            if table is not None:
                rows = list(zip(*(table.column(n).to_pylist() for n in names)))
                owners: dict[tuple[str, str, str], set[str]] = {}
                for uri, doc_id, retryable, _a, fp, shard, _r, _s in rows:
                    if not retryable:
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
                replaced = {(uri, r) for uri, _d, retryable, _a, _fp, shard, r, _s in rows
                            if r and not retryable and shard not in losers}
                stale = replaced & {(uri, d) for uri, d, *_rest in rows}
                if stale:
                    if repair:
                        self.drop_versions(stale)
                    problems.append(Problem("old_version", self.url, f"{len(stale)} documents rows of files' older "
                                            "versions after their newer version committed", repaired=repair))
        if repair and lease is not None:
            for row in self._running_rows(lease.run_id):
                row = {**row, "status": "interrupted", "message": row.get("message") or
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
            out += [r for r in rows if r["status"] == "running" and r["run_id"] != current_run
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
                                                   if k in (GENERATION_KEY, PAGES_ROWS_KEY)})
            removed += sum(drop)
            log.info("dropped %d rows of older file versions from shard %s", sum(drop), shard)
        return removed

    def _repair_superseded(self) -> None:
        """Finish a retry's commit that a crash cut short: drop superseded failure rows."""
        parts = self.part_files(DOCUMENTS)
        if len(parts) < 2:
            return
        table = self.open_table(DOCUMENTS).to_table(
            columns=["source_uri", "doc_id", "error_retryable", "attempt", "shard_id"]
        )
        latest: dict[tuple[str, str], int] = {}
        rows = list(zip(*(table.column(c).to_pylist() for c in table.column_names)))
        for uri, doc_id, _retryable, attempt, _shard in rows:
            key = (uri, doc_id)
            latest[key] = max(latest.get(key, 0), int(attempt or 1))
        stale = {(u, d) for u, d, r, a, _s in rows if r and int(a or 1) < latest[(u, d)]}
        if stale:
            keep: dict[tuple[str, str], str] = {}
            for uri, doc_id, _r, attempt, shard in rows:
                if (uri, doc_id) in stale and int(attempt or 1) == latest[(uri, doc_id)]:
                    keep[(uri, doc_id)] = shard
            for key, shard in keep.items():
                self.drop_superseded({key}, keep_shard=shard)

    # ---- runs ---------------------------------------------------------------------------
    def write_run(self, row: Mapping[str, Any]) -> None:
        """Write (or replace) this run's row of the runs table."""
        table = pa.Table.from_pylist([dict(row)], schema=RUNS_SCHEMA)
        self.write_table(self.path(RUNS, shard_file_name(str(row["run_id"]))), conform(table, RUNS_SCHEMA))

    def read_runs(self) -> list[dict[str, Any]]:
        """Rows of the runs table, oldest first."""
        if not self.part_files(RUNS):
            return []
        rows = self.open_table(RUNS).to_table().to_pylist()
        return sorted(rows, key=lambda r: r["started_at"])

    # ---- compaction ---------------------------------------------------------------------
    # Nightly runs add a few small shard files each; `compact` merges them into shards
    # named `c-<hash>`. The switch is one atomic write, the merged documents file; just
    # before it, a manifest `_docpipe/compactions/<table>-<merged>.json` names the shards it
    # replaces. Once the merged file exists, readers of committed shards (`open_table`,
    # `read_state`) hide the replaced ones, so they see the old files or the merged one:
    # never both, never neither. The old files are removed `grace_s` later (readers that
    # listed before the switch can still open them); a compaction cut short is finished by
    # the next one. Globbing readers (`read_parquet('out/pages/*.parquet')`) do not read
    # manifests: they see the replaced rows twice from the merged write until the removal.

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
            if statuses and "running" not in statuses:
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


def _with_metadata(table: pa.Table, metadata: Mapping[bytes, bytes] | None) -> pa.Table:
    if not metadata:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def _row_order(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Documents rows in attempt order, so a later attempt's verdict wins."""
    return (row[0], row[1], int(row[7] or 1))


def _lease_bytes(info: LeaseInfo) -> bytes:
    return json.dumps(asdict(info), sort_keys=True).encode()


# ---------------------------------------------------------------------------------------
# A held lease
# ---------------------------------------------------------------------------------------


class Lease:
    """Ownership of an output by one run (and its fanned-out shard runs), kept fresh by a
    background heartbeat. `ensure()` before each commit; `release()` at the end."""

    def __init__(self, dataset: Dataset, info: LeaseInfo, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.dataset = dataset
        self.info = info
        self.heartbeat_s = heartbeat_s
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @classmethod
    def join(cls, dataset: Dataset, generation: int, run_id: str, *, heartbeat_s: float = HEARTBEAT_S) -> "Lease":
        """Act under a parent run's lease (fanned-out shards): LeaseLost if it is not current."""
        lease = cls(dataset, LeaseInfo(generation, run_id, _host(), os.getpid(), 0.0, 0.0, LEASE_TTL_S),
                    heartbeat_s=heartbeat_s)
        current = dataset.read_lease(generation)
        if current is None or current.run_id != run_id:
            raise LeaseLost(f"run {run_id} holds no lease generation {generation} on the output")
        lease.info = current
        lease.ensure()
        return lease

    def check(self) -> str | None:
        """Why this lease is no longer ours (None while it is)."""
        if self._lost:
            return self._lost
        gens = self.dataset.lease_generations()
        if gens and gens[-1] > self.generation:
            newer = self.dataset.read_lease(gens[-1])
            who = newer.describe() if newer else f"generation {gens[-1]}"
            return f"the output was taken over by {who}"
        current = self.dataset.read_lease(self.generation)
        if current is None:
            return "the lease file disappeared"
        if current.run_id != self.run_id:
            return f"the lease belongs to run {current.run_id}"
        if current.released:
            return "the lease was released"
        return None

    def ensure(self) -> None:
        reason = self.check()
        if reason:
            self._lost = reason
            raise LeaseLost(f"run {self.run_id} lost the output: {reason}")

    def refresh(self) -> None:
        """Renew the heartbeat (only while this generation is still the newest)."""
        self.ensure()
        current = self.dataset.read_lease(self.generation) or self.info
        renewed = LeaseInfo(**{**asdict(current), "heartbeat_at": time.time()})
        self.dataset.write_bytes(self.dataset._lease_path(self.generation), _lease_bytes(renewed))
        self.info = renewed

    def start_heartbeat(self) -> "Lease":
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="docpipe-lease", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage blip: try again next beat
                log.warning("lease heartbeat failed (%s); retrying", exc)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def release(self) -> None:
        """Give the output up (the next run may take it at once)."""
        self.stop_heartbeat()
        if self.check() is None:
            released = LeaseInfo(**{**asdict(self.info), "released": True, "heartbeat_at": time.time()})
            try:
                self.dataset.write_bytes(self.dataset._lease_path(self.generation), _lease_bytes(released))
            except Exception as exc:  # noqa: BLE001 - it lapses by itself after its ttl
                log.warning("could not release the output lease (%s); it lapses in %.0f s", exc, self.info.ttl_s)

    def __enter__(self) -> "Lease":
        return self.start_heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.release()


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


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _check_not_null(table: pa.Table, schema: pa.Schema) -> None:
    for column in schema:
        if not column.nullable and table.column(column.name).null_count:
            raise ValueError(f"column {column.name!r} must not be null")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema` (order, types, field and schema metadata)."""
    if not table.schema.equals(schema, check_metadata=True):
        missing = sorted(set(schema.names) - set(table.column_names))
        extra = sorted(set(table.column_names) - set(schema.names))
        if missing or extra:
            raise ValueError(f"table does not match the schema: missing {missing}, unexpected {extra}")
        table = table.select(schema.names).cast(schema)
    _check_not_null(table, schema)
    return table


__all__ = [
    "CompactionResult",
    "DOCUMENTS",
    "Dataset",
    "DoneState",
    "Lease",
    "LeaseInfo",
    "LeaseLost",
    "OutputBusy",
    "OutputNotWritable",
    "PAGES",
    "PlanRecord",
    "RUNS",
    "conform",
    "shard_file_name",
    "shard_id_of",
]
