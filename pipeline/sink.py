"""Rows -> Arrow tables in the `schemas/` contract -> Parquet files, written atomically.

Output layout (one file per table per shard):

    OUT/pages/part-<shard_id>.parquet
    OUT/documents/part-<shard_id>.parquet   <- written last: the shard's commit marker

A file never appears half-written under its final name: on the local file system it is
written under a dot-prefixed temporary name in the same folder and renamed; on object
stores it is built in memory and uploaded with one PUT. Rewriting a shard first removes
its documents file (un-commit), then replaces the pages file, then the documents file, so
a crash at any point leaves the shard either done with consistent files or not done.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.records import DocumentOutcome, KnownFile, PageAnswers, PageImage, StageError, TilePlan
from pipeline.sources import full_uri, is_local, resolve
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, SCHEMAS

log = logging.getLogger(__name__)

PAGES = "pages"
DOCUMENTS = "documents"
PARQUET_COMPRESSION = "zstd"

_PART_RE = re.compile(r"^part-(?P<shard>[^/\\]+)\.parquet$")
_TEMP_MARK = ".tmp-"


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def _error_columns(error: StageError | None) -> dict[str, str | None]:
    if error is None:
        return {"error_stage": None, "error_type": None, "error_message": None}
    return {"error_stage": error.stage.value, "error_type": error.type, "error_message": error.message}


def _page_columns(page: PageImage | None) -> dict[str, Any]:
    if page is None:
        names = ("page_kind", "width_px", "height_px", "dpi", "requested_dpi", "downscaled", "render_note",
                 "rotation", "text_layer", "text_layer_chars")
        return dict.fromkeys(names)
    render = page.render
    return {
        "page_kind": page.kind.value,
        "width_px": render.width,
        "height_px": render.height,
        "dpi": render.dpi,
        "requested_dpi": render.requested_dpi,
        "downscaled": render.downscaled,
        "render_note": render.note,
        "rotation": page.rotation,
        "text_layer": page.text,
        "text_layer_chars": None if page.text is None else len(page.text),
    }


def _plan_columns(plan: TilePlan | None) -> dict[str, Any]:
    if plan is None:
        names = ("tiling_policy", "grid_cols", "grid_rows", "tile_count", "has_thumbnail", "visual_tokens")
        return dict.fromkeys(names)
    return {
        "tiling_policy": plan.policy,
        "grid_cols": plan.cols,
        "grid_rows": plan.rows,
        "tile_count": plan.tiles,
        "has_thumbnail": plan.thumbnail,
        "visual_tokens": plan.visual_tokens,
    }


def _answer_columns(answers: PageAnswers | None) -> dict[str, Any]:
    if answers is None:
        names = ("description", "ocr_text", "has_chart", "chart_check_answer", "chart_answers", "model_id", "model_revision",
                 "model_dtype", "prompt_version", "prompt_tokens", "generated_tokens", "inference_latency_s",
                 "truncated", "repetitive")
        return dict.fromkeys(names)
    return {
        "description": answers.description,
        "ocr_text": answers.ocr_text,
        "has_chart": answers.has_chart,
        "chart_check_answer": answers.chart_check_answer,
        "chart_answers": [{"question": a.question, "answer": a.answer} for a in answers.chart_answers],
        "model_id": answers.model_id,
        "model_revision": answers.model_revision,
        "model_dtype": answers.model_dtype,
        "prompt_version": answers.prompt_version,
        "prompt_tokens": answers.prompt_tokens,
        "generated_tokens": answers.generated_tokens,
        "inference_latency_s": answers.latency_s,
        "truncated": answers.truncated,
        "repetitive": answers.repetitive,
    }


def page_row(
    *,
    doc_id: str,
    source_uri: str,
    page_number: int,
    page: PageImage | None,
    plan: TilePlan | None,
    answers: PageAnswers | None,
    error: StageError | None,
    shard_id: str,
    run_id: str,
    fingerprint: str,
) -> dict[str, Any]:
    """One row of the pages table. `error` (or else `answers.error`) makes the status 'error'."""
    effective_error = error if error is not None else (answers.error if answers is not None else None)
    row: dict[str, Any] = {
        "doc_id": doc_id,
        "source_uri": source_uri,
        "page_number": page_number,
        **_page_columns(page),
        **_plan_columns(plan),
        **_answer_columns(answers),
        "status": "ok" if effective_error is None else "error",
        **_error_columns(effective_error),
        "shard_id": shard_id,
        "run_id": run_id,
        "config_fingerprint": fingerprint,
    }
    return {name: row[name] for name in PAGES_SCHEMA.names}


def document_row(
    outcome: DocumentOutcome, *, shard_id: str, run_id: str, fingerprint: str, processed_at: datetime
) -> dict[str, Any]:
    """One row of the documents table. `processed_at` must be timezone-aware."""
    if processed_at.tzinfo is None or processed_at.utcoffset() is None:
        raise ValueError("processed_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    ref, timings = outcome.ref, outcome.timings
    row: dict[str, Any] = {
        "doc_id": ref.doc_id,
        "source_uri": ref.uri,
        "size_bytes": ref.size,
        "media_type": ref.media_type,
        "page_count": outcome.page_count,
        "pages_ok": outcome.pages_ok,
        "pages_failed": outcome.pages_failed,
        "status": outcome.status.value,
        "duplicate_of": ref.duplicate_of,
        "source_version": ref.version,
        **_error_columns(outcome.error if outcome.error is not None else ref.error),
        "rasterize_s": timings.rasterize_s,
        "tiling_s": timings.tiling_s,
        "inference_s": timings.inference_s,
        "total_s": timings.total_s,
        "shard_id": shard_id,
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "processed_at": processed_at.astimezone(timezone.utc),
    }
    return {name: row[name] for name in DOCUMENTS_SCHEMA.names}


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _check_not_null(table: pa.Table, schema: pa.Schema) -> None:
    for column in schema:
        if not column.nullable and table.column(column.name).null_count:
            raise ValueError(f"column {column.name!r} must not be null")


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with exactly the schema's field names) as a validated table of `schema`."""
    expected = set(schema.names)
    for index, row in enumerate(rows):
        if row.keys() != expected:
            missing, extra = sorted(expected - row.keys()), sorted(row.keys() - expected)
            raise ValueError(f"row {index} does not match the schema: missing {missing}, unexpected {extra}")
    if not rows:
        return schema.empty_table()
    table = pa.Table.from_pylist(rows, schema=schema)
    table.validate(full=True)
    _check_not_null(table, schema)
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
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
# Paths
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


def _listing(fs: fsspec.AbstractFileSystem, folder: str) -> list[dict[str, Any]]:
    """Files directly in `folder` (with details); empty when the folder does not exist."""
    if not is_local(fs):
        fs.invalidate_cache(folder)  # other processes write here: never trust a cached listing
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    return [e for e in entries if e.get("type") == "file" and not e["name"].endswith("/")]


def _part_files(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, str]:
    """shard id -> path of the committed-looking part files in `folder` (temp files excluded)."""
    out: dict[str, str] = {}
    for entry in _listing(fs, folder):
        shard = shard_id_of(entry["name"])
        if shard is not None:
            out[shard] = entry["name"]
    return out


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow file system for `fs` (native when local, the fsspec adapter otherwise)."""
    return pafs.LocalFileSystem() if is_local(fs) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


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


def _write_local(path: str, table: pa.Table) -> None:
    folder, name = path.rsplit("/", 1)
    os.makedirs(folder, exist_ok=True)
    temp = f"{folder}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}"
    try:
        pq.write_table(table, temp, compression=PARQUET_COMPRESSION)
        _fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        try:
            os.remove(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_path(folder, directory=True)


def _write_remote(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression=PARQUET_COMPRESSION)
    fs.pipe_file(path, buffer.getvalue().to_pybytes())  # one PUT: the object appears whole or not at all


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    if is_local(fs):
        _write_local(path, table)
    else:
        _write_remote(fs, path, table)


def write_shard(
    output_url: str,
    shard_id: str,
    pages: pa.Table,
    documents: pa.Table,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write a shard's pages file, then its documents file (the commit marker), atomically.

    Rewriting a shard id replaces both files. Raises on storage errors (the caller retries
    the shard); whatever happens, no half-written file appears under a final name.
    """
    name = shard_file_name(shard_id)
    pages = _conform(pages, PAGES_SCHEMA)
    documents = _conform(documents, DOCUMENTS_SCHEMA)
    fs, root = resolve(output_url, storage_options)
    docs_path = _join(root, DOCUMENTS, name)
    try:  # un-commit first, so a crash below leaves the shard "not done" rather than mixed
        fs.rm_file(docs_path)
    except FileNotFoundError:
        pass
    _write_atomic(fs, _join(root, PAGES, name), pages)
    _write_atomic(fs, docs_path, documents)


# ---------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoneState:
    """What an output dataset already holds (for resume)."""

    shard_ids: frozenset[str] = frozenset()  # shards whose documents file exists
    doc_keys: frozenset[tuple[str, str]] = frozenset()  # (source_uri, doc_id) of every documents row
    doc_ids_with_pages: frozenset[str] = frozenset()  # doc_ids processed (status ok, partial or error)
    # source_uri -> size, version, id and media type, for files recorded with a version:
    # discovery skips re-reading those whose listing still shows the same size and version.
    known: Mapping[str, KnownFile] = field(default_factory=dict, hash=False, compare=False)


_PROCESSED = ("ok", "partial", "error")


def read_done(output_url: str, storage_options: dict[str, Any] | None = None) -> DoneState:
    """Committed shards and documents under `output_url` (empty when nothing is there)."""
    fs, root = resolve(output_url, storage_options)
    parts = _part_files(fs, _join(root, DOCUMENTS))
    if not parts:
        return DoneState()
    # The current schema, so files written before a column was added read it as null.
    dataset = ds.dataset(sorted(parts.values()), schema=DOCUMENTS_SCHEMA, format="parquet", filesystem=_arrow_fs(fs))
    names = ["source_uri", "doc_id", "status", "size_bytes", "source_version", "media_type"]
    uris, ids, statuses, sizes, versions, media = (dataset.to_table(columns=names).column(c).to_pylist() for c in names)
    known = {
        uri: KnownFile(size=size, version=version, doc_id=doc_id, media_type=media_type)
        for uri, doc_id, size, version, media_type in zip(uris, ids, sizes, versions, media)
        if version and doc_id and size is not None and media_type
    }
    return DoneState(
        shard_ids=frozenset(parts),
        doc_keys=frozenset(zip(uris, ids)),
        doc_ids_with_pages=frozenset(i for i, s in zip(ids, statuses) if s in _PROCESSED),
        known=known,
    )


def shard_done(output_url: str, shard_id: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the shard is committed (its documents file exists)."""
    fs, root = resolve(output_url, storage_options)
    path = _join(root, DOCUMENTS, shard_file_name(shard_id))
    if not is_local(fs):
        fs.invalidate_cache(path)
    return bool(fs.exists(path))


def _age_s(info: dict[str, Any], now: float) -> float | None:
    """Seconds since the file was last written, from its listing entry; None when unknown."""
    stamp = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    return None if not isinstance(stamp, (int, float)) else now - float(stamp)


def clean_orphans(
    output_url: str, storage_options: dict[str, Any] | None = None, *, older_than_s: float = 0.0
) -> list[str]:
    """Delete pages files whose documents file is missing and leftover temp files.

    Returns the URIs removed. Call it when no shard writer is active on this output (e.g.
    before a run fans out), or pass `older_than_s` above the longest shard write so that
    files of writers still at work are left alone (files of unknown age are then kept too).
    """
    fs, root = resolve(output_url, storage_options)
    committed = set(_part_files(fs, _join(root, DOCUMENTS)))
    now = time.time()
    removed: list[str] = []
    for table in (PAGES, DOCUMENTS):
        for entry in _listing(fs, _join(root, table)):
            path = entry["name"]
            orphan = table == PAGES and (shard := shard_id_of(path)) is not None and shard not in committed
            if not (orphan or _is_temp(path)):
                continue
            age = _age_s(entry, now)
            if older_than_s > 0 and (age is None or age < older_than_s):
                continue
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                continue
            removed.append(full_uri(fs, path))
            log.info("removed orphan output file %s", full_uri(fs, path))
    return removed


def open_dataset(output_url: str, table: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """The committed files of one table (`pages` or `documents`) as a pyarrow dataset.

    Only shards whose documents file exists are included, so orphan pages files of an
    interrupted shard never show; an output with nothing yet gives an empty dataset.
    """
    if table not in SCHEMAS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    fs, root = resolve(output_url, storage_options)
    committed = _part_files(fs, _join(root, DOCUMENTS))
    parts = committed if table == DOCUMENTS else _part_files(fs, _join(root, PAGES))
    paths = sorted(path for shard, path in parts.items() if shard in committed)
    return ds.dataset(paths, schema=SCHEMAS[table], format="parquet", filesystem=_arrow_fs(fs))
