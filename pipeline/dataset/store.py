"""The output's storage layer: table names, file naming, atomic and exclusive writes, fsync,
listings, and conforming tables to their schema. Every file of the output is written here.

`_Store` is the base of `Dataset` (pipeline/dataset/__init__.py); the other modules of this
package add the protocol's operations on top of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources import full_uri, is_local, resolve

log = logging.getLogger("pipeline.dataset")

PAGES = "pages"
DOCUMENTS = "documents"
RUNS = "runs"
META = "_docpipe"
PARQUET_COMPRESSION = "zstd"

_PART_RE = re.compile(r"^part-(?P<shard>[^/\\]+)\.parquet$")
_TEMP_MARK = ".tmp-"
GENERATION_KEY = b"docpipe.lease_generation"  # documents files: the lease generation that committed it
PAGES_ROWS_KEY = b"docpipe.pages_rows"  # documents files: rows its shard's pages file holds
COMMIT_KEY = b"docpipe.commit_id"  # documents files: a nonce of the commit attempt that wrote it


class OutputNotWritable(RuntimeError):
    """The output cannot be written (read-only, missing permission, a file in the way)."""


class OutputUnsafe(OutputNotWritable):
    """A folder docpipe writes in or removes from is a symbolic link (it may lead out of the output)."""


# The folders under the output root that docpipe writes in, moves files between or removes
# files from. On a local disk none of them may be a symbolic link: docpipe never writes,
# moves or deletes through a link that may lead out of the output (docs/exactly-once.md).
INTERNAL_FOLDERS = (PAGES, DOCUMENTS, RUNS, META, *(f"{META}/{name}" for name in (
    "lease", "plans", "staging", "fenced", "quarantine", "compactions", "reports")))
# Folders whose subfolders are docpipe's too (a lease generation's staging folder, a fenced
# one), with the subfolders of those.
_NESTED_FOLDERS = (f"{META}/staging", f"{META}/fenced")
_STAGE_SUBFOLDERS = (PAGES, DOCUMENTS)


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


def is_own_file(name: str) -> bool:
    """Whether a file of a table or staging folder has a name docpipe gives (a part file or one
    of its temp files): the only files docpipe removes from those folders."""
    return shard_id_of(name) is not None or _is_temp(name)


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


_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def _with_metadata(table: pa.Table, metadata: Mapping[bytes, bytes] | None) -> pa.Table:
    if not metadata:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


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


# ---------------------------------------------------------------------------------------
# Files of one output root
# ---------------------------------------------------------------------------------------


class _Store:
    """An output root: paths, listings, and whole-file reads and writes."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = resolve(url, self.storage_options)
        self.local = is_local(self.fs)

    # ---- files -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    # ---- containment: never through a link out of the output ---------------------------
    def _link_message(self, path: str) -> str:
        rel = path[len(self.root.rstrip("/")) + 1:]
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        return (f"output {self.root}: {rel}/ is a symbolic link{target}; docpipe never writes, moves or deletes "
                "through a link that may lead out of the output: make it a real folder (or point the output "
                "itself at the disk you want)")

    def check_contained(self) -> None:
        """OutputUnsafe when a folder docpipe writes in or removes from is a symbolic link
        (INTERNAL_FOLDERS, and the lease generations' staging and fenced folders). Called
        before any work: taking the lease, the write probe. The output root may be a link."""
        if not self.local:
            return  # object stores have no links
        for rel in INTERNAL_FOLDERS:
            if os.path.islink(self.path(rel)):
                raise OutputUnsafe(self._link_message(self.path(rel)))
        for rel in _NESTED_FOLDERS:
            try:
                names = sorted(os.listdir(self.path(rel)))
            except OSError:  # not there (or not a folder: the writes say so)
                continue
            for name in names:
                for path in (self.path(rel, name), *(self.path(rel, name, sub) for sub in _STAGE_SUBFOLDERS)):
                    if os.path.islink(path):
                        raise OutputUnsafe(self._link_message(path))

    def _guard(self, path: str) -> None:
        """OutputUnsafe unless every folder between the output root and `path` is a real folder
        (local disks; checked right before each write, move and removal)."""
        if not self.local:
            return
        root = self.root.rstrip("/")
        if not path.startswith(root + "/"):
            raise OutputUnsafe(f"{path} is not inside the output {root}; docpipe writes only inside it")
        current = root
        for part in path[len(root) + 1:].split("/")[:-1]:
            current = f"{current}/{part}"
            if os.path.islink(current):
                raise OutputUnsafe(self._link_message(current))

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
        return [e for e in entries if e.get("type") == "file" and not e.get("islink") and not e["name"].endswith("/")]

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
        self._guard(path)
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

    def create_exclusive(self, path: str, data: bytes, *, mine: Callable[[bytes], bool] | None = None) -> bool:
        """Create `path` with `data` only if nothing is there; False when something was.

        Locally a temp file is hard-linked to the final name (link fails if it exists, and
        the file appears with its content); on S3 the PUT carries `If-None-Match: *`.
        Other stores fall back to check-then-write (documented as best effort).

        An object store can carry out a write and still answer a failure (a 500, a dropped
        connection); the client retries and is told the object exists, which it does
        because of this very write. So when the store says "exists", the object is read
        back and `mine(bytes)` decides whether it is this write (default: the same bytes):
        then the create succeeded. Callers pass a `mine` that checks a nonce of theirs.
        """
        if self.local:
            self._guard(path)
            folder, name = path.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            temp = f"{folder}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}"
            try:
                with open(temp, "wb") as fh:
                    fh.write(data)
                os.link(temp, path)
                _fsync_path(folder, directory=True)
                return True
            except FileExistsError:
                return False
            finally:  # also when the write fails (a full disk): no temp file is left behind
                try:
                    os.remove(temp)
                except FileNotFoundError:
                    pass
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "s3" in protocols:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                pass
            try:
                existing = self._read_small(path)
            except FileNotFoundError:  # removed again meanwhile: not this write's
                return False
            if (mine or (lambda raw: raw == data))(existing):
                log.info("the store answered a failure for the exclusive write of %s that it carried out; "
                         "the object is this write", full_uri(self.fs, path))
                return True
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
        self._guard(path)
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
        self.check_contained()
        probe = self.path(META, f".probe{_TEMP_MARK}{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"docpipe write probe\n")
            self.remove(probe)
        except (OSError, PermissionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise OutputNotWritable(f"output {where} is not writable: {reason}") from None

    def _read_part(self, path: str, schema: pa.Schema) -> pa.Table:
        return ds.dataset([path], schema=schema, format="parquet", filesystem=self.arrow_fs()).to_table()

    def _footer(self, path: str) -> pq.FileMetaData:
        return pq.read_metadata(path, filesystem=self.arrow_fs())

    def _subfolders(self, folder: str) -> list[str]:
        if not self.local:
            self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.get("type") == "directory" and not e.get("islink"))  # a link is never walked into
