"""dataset: the output's commit protocol — atomic shards, what is done, cleanup, leases, plans, S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import fsspec
import fsspec.implementations.memory
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import (
    Dataset,
    DoneState,
    Lease,
    LeaseInfo,
    LeaseLost,
    OutputBusy,
    OutputNotWritable,
    PlanRecord,
)
from pipeline.records import DocStatus, Stage, StageError
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, SCHEMA_VERSION, VERSION_KEY
from tests.test_sink import WHEN, COMMON, _doc, _files, _same_schema, _shard_tables, _verdict


def write_shard(url, shard_id, pages, documents, storage_options=None):
    Dataset(url, storage_options).commit_shard(shard_id, pages, documents)


def read_done(url, storage_options=None) -> DoneState:
    return Dataset(url, storage_options).read_state()


def open_dataset(url, table, storage_options=None):
    return Dataset(url, storage_options).open_table(table)


def shard_done(url, shard_id, storage_options=None) -> bool:
    return Dataset(url, storage_options).shard_done(shard_id)


def test_round_trip_keeps_schema_and_metadata(tmp_path: Path) -> None:
    pages, documents = _shard_tables("s1", ["a", "b"])
    write_shard(str(tmp_path), "s1", pages, documents)
    for folder, table, schema in (("pages", pages, PAGES_SCHEMA), ("documents", documents, DOCUMENTS_SCHEMA)):
        path = tmp_path / folder / "part-s1.parquet"
        back = pq.read_table(path)
        commit_keys = (b"docpipe.lease_generation", b"docpipe.pages_rows", b"docpipe.commit_id")
        assert (folder == "documents") == all(k in back.schema.metadata for k in commit_keys)
        bare = back.schema.with_metadata({k: v for k, v in back.schema.metadata.items() if k not in commit_keys})
        assert _same_schema(bare, schema)
        assert back.schema.metadata[VERSION_KEY] == SCHEMA_VERSION.encode()
        assert back.schema.field("doc_id").metadata[b"description"]
        assert back.to_pylist() == table.to_pylist()
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    answers_type = pq.read_schema(tmp_path / "pages" / "part-s1.parquet").field("chart_answers").type.value_type
    assert answers_type.field("question").metadata[b"description"] == b"Question asked about the chart."
    assert _files(tmp_path / "pages") == _files(tmp_path / "documents") == ["part-s1.parquet"]


def test_duckdb_and_pyarrow_read_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for shard, names in (("s1", ["a", "b"]), ("s2", ["c"])):
        write_shard(str(out), shard, *_shard_tables(shard, names))
    (out / "pages" / ".part-s3.parquet.tmp-123").write_bytes(b"half a file")  # a crashed writer's leftover

    with duckdb.connect() as con:
        count, docs, first_answer = con.execute(
            f"select count(*), count(distinct doc_id), min(chart_answers[1].answer) "
            f"from read_parquet('{out}/pages/**/*.parquet')"
        ).fetchone()
        assert (count, docs, first_answer) == (6, 3, "bar")
        documents_glob = f"{out}/documents/*.parquet"
        statuses = con.execute(f"select status, count(*) from read_parquet('{documents_glob}') group by 1").fetchall()
        assert statuses == [("ok", 3)]

    pages = open_dataset(str(out), "pages").to_table()
    assert pages.num_rows == 6 and pages.schema.equals(PAGES_SCHEMA, check_metadata=True)
    assert pages.column("chart_answers")[0].as_py()[0] == {"question": "What type of chart?", "answer": "bar"}
    assert open_dataset(str(out), "documents").to_table().schema.equals(DOCUMENTS_SCHEMA, check_metadata=False)
    plain = ds.dataset(str(out / "pages"), format="parquet")  # dot-prefixed temp files are ignored
    assert plain.to_table(columns=["shard_id"]).column("shard_id").to_pylist().count("s1") == 4


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a", "b"]))
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["c"]))
    state = read_done(str(tmp_path))
    assert state.shard_ids == {"s1"} and {uri for uri, _ in state.doc_keys} == {"/in/c"}
    assert open_dataset(str(tmp_path), "pages").count_rows() == 2
    assert _files(tmp_path / "pages") == ["part-s1.parquet"]


def test_write_shard_conforms_and_rejects_tables(tmp_path: Path) -> None:
    pages, documents = _shard_tables("s1", ["a"])
    reordered = pages.select(list(reversed(pages.column_names))).replace_schema_metadata(None)
    write_shard(str(tmp_path), "s1", reordered, documents)
    assert _same_schema(pq.read_schema(tmp_path / "pages" / "part-s1.parquet"), PAGES_SCHEMA)
    with pytest.raises(ValueError, match="missing"):
        write_shard(str(tmp_path), "s2", pages.drop_columns(["ocr_text"]), documents)
    for bad in ("", "../up", "a/b", ".hidden", " pad"):
        with pytest.raises(ValueError, match="invalid shard id"):
            write_shard(str(tmp_path), bad, pages, documents)
    assert read_done(str(tmp_path)).shard_ids == {"s1"}


def test_read_done(tmp_path: Path) -> None:
    assert read_done(str(tmp_path / "missing")) == DoneState()
    (tmp_path / "out" / "documents").mkdir(parents=True)
    assert read_done(str(tmp_path / "out")) == DoneState()
    pages, documents = _shard_tables("s1", ["a", "b", "c"], {"b": DocStatus.DUPLICATE, "c": DocStatus.ERROR})
    write_shard(str(tmp_path / "out"), "s1", pages, documents)
    write_shard(str(tmp_path / "out"), "s2", *_shard_tables("s2", ["d"], {"d": DocStatus.PARTIAL}))
    state = read_done(str(tmp_path / "out"))
    assert state.shard_ids == frozenset({"s1", "s2"})
    assert state.doc_keys == frozenset((f"/in/{n}", (n * 64)[:64]) for n in "abcd")
    # duplicates and failures are done, but only ok/partial documents have pages to point copies at
    assert set(state.processed) == {(n * 64)[:64] for n in "ad"}


# ---- atomicity ---------------------------------------------------------------------------


def _crash_on_write(monkeypatch: pytest.MonkeyPatch, crash_on_call: int) -> list[str]:
    """Make the n-th file write (1-based) die: locally after the temp file is written and
    before its rename, on object stores in the PUT. Returns the names in the target folder at
    the moment of the crash: what a reader would see, and what a kill there would leave."""
    calls: list[int] = []
    seen_at_crash: list[str] = []
    real_replace = os.replace
    real_pipe = fsspec.implementations.memory.MemoryFileSystem.pipe_file

    def flaky_replace(src, dst, *args, **kwargs):
        calls.append(1)
        if len(calls) != crash_on_call:
            return real_replace(src, dst, *args, **kwargs)
        seen_at_crash.extend(sorted(os.listdir(os.path.dirname(dst))))
        os.remove(src)  # what the writer's own clean-up does on the way out
        raise OSError(28, "No space left on device")

    def flaky_pipe(self, path, value, *args, **kwargs):
        calls.append(1)
        if len(calls) != crash_on_call:
            return real_pipe(self, path, value, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", flaky_replace)
    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "pipe_file", flaky_pipe)
    return seen_at_crash


def test_crash_while_writing_pages_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a"]))
    before = read_done(str(tmp_path))
    seen = _crash_on_write(monkeypatch, crash_on_call=1)
    with pytest.raises(OSError, match="No space"):
        write_shard(str(tmp_path), "s2", *_shard_tables("s2", ["b"]))
    # At the crash the half file had a dot-prefixed temporary name, never the final one.
    assert "part-s2.parquet" not in seen and any(n.startswith(".part-s2.parquet.tmp-") for n in seen)
    assert _files(tmp_path / "pages") == _files(tmp_path / "documents") == ["part-s1.parquet"]
    assert read_done(str(tmp_path)) == before


def test_crash_while_writing_documents_shows_readers_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a"]))
    before = read_done(str(tmp_path))
    seen = _crash_on_write(monkeypatch, crash_on_call=2)
    with pytest.raises(OSError):
        write_shard(str(tmp_path), "s2", *_shard_tables("s2", ["b"]))
    assert "part-s2.parquet" not in seen and any(n.startswith(".part-s2.parquet.tmp-") for n in seen)
    # the uncommitted shard's pages are staged, not where a globbing reader looks
    assert _files(tmp_path / "pages") == ["part-s1.parquet"]
    assert _files(tmp_path / "documents") == ["part-s1.parquet"]  # no half file, no temp file
    assert read_done(str(tmp_path)) == before
    assert shard_done(str(tmp_path), "s1") and not shard_done(str(tmp_path), "s2")
    staged = tmp_path / "_docpipe" / "staging" / "nolease" / "pages" / "part-s2.parquet"
    assert staged.exists()
    (removed,) = Dataset(str(tmp_path)).clean()
    assert removed.endswith("/pages/part-s2.parquet") and "_docpipe/fenced/nolease-" in removed
    assert not staged.exists() and _files(tmp_path / "pages") == ["part-s1.parquet"]


def test_a_crash_after_the_commit_is_rolled_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self, shard_id, *args):  # staged, committed, then the process dies moving the pages in
        raise OSError(5, "killed")

    monkeypatch.setattr(Dataset, "_publish_pages", killed)
    with pytest.raises(OSError):
        write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a"]))
    monkeypatch.undo()
    assert shard_done(str(tmp_path), "s1") and _files(tmp_path / "pages") == []  # nothing half-visible
    Dataset(str(tmp_path)).clean()  # the next run, under the lease
    assert _files(tmp_path / "pages") == ["part-s1.parquet"]
    assert open_dataset(str(tmp_path), "pages").count_rows() == 2


def test_crash_while_rewriting_uncommits_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a"]))
    _crash_on_write(monkeypatch, crash_on_call=2)
    with pytest.raises(OSError):
        write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["b"]))
    # New pages but old documents would be a lie: the shard is simply not done any more.
    assert read_done(str(tmp_path)) == DoneState()
    monkeypatch.undo()
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["b"]))
    assert {uri for uri, _ in read_done(str(tmp_path)).doc_keys} == {"/in/b"}


def test_crash_on_an_object_store_leaves_no_object(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://docpipe-sink-{uuid.uuid4().hex[:8]}"
    fs, root = fsspec.core.url_to_fs(url)
    try:
        _crash_on_write(monkeypatch, crash_on_call=1)
        with pytest.raises(OSError):
            write_shard(url, "s1", *_shard_tables("s1", ["a"]))
        assert not fs.exists(f"{root}/pages/part-s1.parquet")
        assert read_done(url) == DoneState()
        monkeypatch.undo()
        write_shard(url, "s1", *_shard_tables("s1", ["a"]))
        assert read_done(url).shard_ids == {"s1"}
        assert open_dataset(url, "pages").count_rows() == 2
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_clean_removes_orphans_stale_temp_files_and_finished_plans(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    assert data.clean() == []  # nothing there yet
    write_shard(str(out), "s1", *_shard_tables("s1", ["a"]))
    orphan = out / "pages" / "part-s9.parquet"
    orphan.write_bytes((out / "pages" / "part-s1.parquet").read_bytes())
    planned = out / "pages" / "part-s8.parquet"  # a shard whose plan says it is still to be (re)written
    planned.write_bytes(orphan.read_bytes())
    data.write_plan(PlanRecord("s8", "r", "fp", {"shard_id": "s8", "refs": []}, time.time()))
    data.write_plan(PlanRecord("s1", "r", "fp", {"shard_id": "s1", "refs": []}, time.time()))  # committed already
    temp_pages = out / "pages" / ".part-s7.parquet.tmp-abc"
    temp_docs = out / "documents" / ".part-s7.parquet.tmp-def"
    temp_pages.write_bytes(b"partial")
    temp_docs.write_bytes(b"partial")

    removed = data.clean(current_fingerprint="fp")
    # fresh temp files may belong to a writer at work: kept; the plan-less orphan goes
    assert str(orphan) in removed and temp_pages.exists() and temp_docs.exists()
    assert planned.exists() and set(data.plans()) == {"s8"}
    old = time.time() - 7200
    for temp in (temp_pages, temp_docs):
        os.utime(temp, (old, old))
    removed = data.clean(current_fingerprint="fp")
    assert sorted(removed) == sorted([str(temp_pages), str(temp_docs)])
    # a plan made under other settings is dropped with its pages file
    data.clean(current_fingerprint="other")
    assert data.plans() == {} and not planned.exists()
    assert _files(out / "pages") == _files(out / "documents") == ["part-s1.parquet"]
    assert read_done(str(out)).shard_ids == {"s1"}


def test_open_dataset_edge_cases(tmp_path: Path) -> None:
    empty = open_dataset(str(tmp_path / "missing"), "pages")
    assert empty.count_rows() == 0 and empty.schema.equals(PAGES_SCHEMA, check_metadata=False)
    with pytest.raises(ValueError, match="unknown table"):
        open_dataset(str(tmp_path), "tiles")


# ---- S3 (moto server) --------------------------------------------------------------------


def test_s3_round_trip(s3_bucket: str, s3_storage_options: dict) -> None:
    url = f"s3://{s3_bucket}/out"
    assert read_done(url, s3_storage_options) == DoneState()
    pages, documents = _shard_tables("s1", ["a", "b"], {"b": DocStatus.DUPLICATE})
    write_shard(url, "s1", pages, documents, s3_storage_options)
    write_shard(url, "s2", *_shard_tables("s2", ["c"]), storage_options=s3_storage_options)

    state = read_done(url, s3_storage_options)
    assert state.shard_ids == {"s1", "s2"}
    assert shard_done(url, "s2", s3_storage_options) and not shard_done(url, "s3", s3_storage_options)
    assert set(state.processed) == {(n * 64)[:64] for n in "ac"}
    fs = fsspec.filesystem("s3", **s3_storage_options)
    with fs.open(f"{s3_bucket}/out/pages/part-s1.parquet", "rb") as fh:
        back = pq.read_table(fh)
    assert _same_schema(back.schema, PAGES_SCHEMA) and back.to_pylist() == pages.to_pylist()
    assert open_dataset(url, "pages", s3_storage_options).count_rows() == 4
    assert open_dataset(url, "documents", s3_storage_options).count_rows() == 3

    fs.pipe_file(f"{s3_bucket}/out/pages/part-s9.parquet", b"orphan")
    assert Dataset(url, s3_storage_options).clean() == [f"{url}/pages/part-s9.parquet"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/pages", refresh=True)) == [
        "part-s1.parquet", "part-s2.parquet"
    ]


def test_read_done_knows_files_by_version_and_reads_older_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq


    docs = tmp_path / "out" / "documents"
    docs.mkdir(parents=True)
    row = {f.name: None for f in DOCUMENTS_SCHEMA}
    row.update(
        doc_id="d1", source_uri="/in/a.pdf", size_bytes=10, media_type="application/pdf", pages_ok=1,
        pages_failed=0, status="ok", source_version="mtime:1.0", shard_id="s1", run_id="r", config_fingerprint="f",
        attempt=1,
        processed_at=datetime.now(timezone.utc),
    )
    pq.write_table(pa.Table.from_pylist([row], schema=DOCUMENTS_SCHEMA), docs / "part-s1.parquet")
    # a file from before source_version existed: the column is simply missing
    newer = ("source_version", "error_retryable", "attempt", "open_note")
    old_schema = pa.schema([f for f in DOCUMENTS_SCHEMA if f.name not in newer])
    old = {k: v for k, v in row.items() if k not in newer} | {"doc_id": "d2", "source_uri": "/in/b.pdf"}
    pq.write_table(pa.Table.from_pylist([old], schema=old_schema), docs / "part-s2.parquet")

    done = read_done(str(tmp_path / "out"))
    assert done.doc_keys == {("/in/a.pdf", "d1"), ("/in/b.pdf", "d2")}
    assert set(done.known) == {"/in/a.pdf"}  # b has no version recorded: it will be read again
    assert done.known["/in/a.pdf"].doc_id == "d1" and done.known["/in/a.pdf"].version == "mtime:1.0"


# ---- leases ------------------------------------------------------------------------------


def _stale(data: Dataset, generation: int, **changes) -> None:
    """Rewrite a lease generation as if its owner had stopped beating long ago (or died)."""
    path = data._lease_path(generation)
    info = json.loads(data.fs.cat_file(path))
    info.update(changes)
    data.write_bytes(path, json.dumps(info).encode())
    if "heartbeat_at" in changes and data.local:  # the store saw it written then, too
        os.utime(path, (changes["heartbeat_at"], changes["heartbeat_at"]))


def test_one_run_owns_an_output_until_it_releases_it(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path / "out"))
    first = data.acquire("run-a")
    t0 = time.monotonic()
    with pytest.raises(OutputBusy, match="in use by run run-a"):
        Dataset(str(tmp_path / "out")).acquire("run-b")
    assert time.monotonic() - t0 < 2  # no wait asked: refused at once
    first.ensure()
    first.release()
    second = Dataset(str(tmp_path / "out")).acquire("run-b")
    assert second.generation == first.generation + 1
    with pytest.raises(LeaseLost):
        first.ensure()  # a released lease is not ours any more


def test_a_waiting_run_gets_the_output_when_the_owner_releases_it(tmp_path: Path) -> None:
    import threading

    data = Dataset(str(tmp_path / "out"))
    first = data.acquire("run-a")
    threading.Timer(1.0, first.release).start()
    second = data.acquire("run-b", wait_s=30)
    assert second.run_id == "run-b" and second.generation == 2


def test_a_lapsed_lease_is_taken_over_and_its_owner_can_no_longer_commit(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path / "out"))
    old = data.acquire("run-old")
    _stale(data, old.generation, heartbeat_at=time.time() - 3600)
    new = Dataset(str(tmp_path / "out")).acquire("run-new")
    assert new.generation == old.generation + 1
    pages, documents = _shard_tables("s1", ["a"])
    with pytest.raises(LeaseLost, match="taken over by run run-new"):
        data.commit_shard("s1", pages, documents, lease=old)
    assert _files(tmp_path / "out" / "pages") == [] and not data.shard_done("s1")
    data.commit_shard("s1", pages, documents, lease=new)
    assert data.shard_done("s1")


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path / "out"))
    old = data.acquire("run-killed")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stale(data, old.generation, pid=dead.pid)  # fresh heartbeat, but the process is gone
    assert data.acquire("run-next").generation == old.generation + 1


def test_racing_runs_never_share_a_generation(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def attempt(i: int) -> int | None:
        try:
            return Dataset(str(tmp_path / "out")).acquire(f"run-{i}").generation
        except OutputBusy:
            return None

    with ThreadPoolExecutor(8) as pool:
        won = [g for g in pool.map(attempt, range(8)) if g is not None]
    assert won == [1]


def test_shard_runs_act_under_their_parents_lease(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path / "out"))
    parent = data.acquire("parent-1")
    child = Lease.join(Dataset(str(tmp_path / "out")), parent.generation, "parent-1")
    child.refresh()  # a child's heartbeat keeps the parent's lease alive
    with pytest.raises(LeaseLost):
        Lease.join(data, parent.generation, "someone-else")
    _stale(data, parent.generation, heartbeat_at=time.time() - 3600)
    Dataset(str(tmp_path / "out")).acquire("parent-2")  # a newer parent after the old one died
    with pytest.raises(LeaseLost):
        child.ensure()
    with pytest.raises(LeaseLost):
        Lease.join(data, parent.generation, "parent-1")


def test_s3_leases_are_exclusive(s3_bucket: str, s3_storage_options: dict) -> None:
    url = f"s3://{s3_bucket}/out"
    first = Dataset(url, s3_storage_options).acquire("run-a")
    with pytest.raises(OutputBusy):
        Dataset(url, s3_storage_options).acquire("run-b")
    # the exclusive create itself: a second PUT of the same generation is refused by the store
    data = Dataset(url, s3_storage_options)
    assert not data.create_exclusive(data._lease_path(first.generation), b"{}")
    first.release()
    assert Dataset(url, s3_storage_options).acquire("run-b").generation == 2


def test_output_probe(tmp_path: Path) -> None:
    Dataset(str(tmp_path / "new" / "out")).check_writable()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritable, match="is a file"):
        Dataset(str(tmp_path / "file")).check_writable()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that may write anywhere")
        with pytest.raises(OutputNotWritable, match="not writable"):
            Dataset(str(ro)).check_writable()
    finally:
        ro.chmod(0o755)


# ---- retries -----------------------------------------------------------------------------


def _docs_with(shard_id: str, name: str, *, status: DocStatus, retryable: bool | None, attempt: int) -> pa.Table:
    from pipeline.sink import document_row, rows_to_table

    outcome = _doc(name, status)
    outcome.attempt = attempt
    if retryable is not None:
        outcome.error = StageError(Stage.SOURCES, "unreadable", "connection reset", retryable=retryable)
        outcome.pages_ok = 0
    row = document_row(outcome, _verdict(outcome, status), shard_id=shard_id, processed_at=WHEN, **COMMON)
    return rows_to_table([row], DOCUMENTS_SCHEMA)


def test_retryable_failures_are_not_done_until_attempts_run_out(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path))
    empty = PAGES_SCHEMA.empty_table()
    data.commit_shard("s1", empty, _docs_with("s1", "a", status=DocStatus.ERROR, retryable=True, attempt=1))
    data.commit_shard("s2", empty, _docs_with("s2", "b", status=DocStatus.ERROR, retryable=False, attempt=1))
    state = data.read_state()
    key_a = ("/in/a", ("a" * 64))
    assert key_a not in state.doc_keys and state.retry == {key_a: 1}
    assert ("/in/b", "b" * 64) in state.doc_keys  # bad input is recorded once
    # the retry commits; the superseded failure row disappears from its old shard
    pages, _ = _shard_tables("s3", ["a"])
    data.commit_shard("s3", pages, _docs_with("s3", "a", status=DocStatus.OK, retryable=None, attempt=2),
                      supersedes=[key_a])
    rows = data.open_table("documents").to_table().to_pylist()
    assert sorted((r["source_uri"], r["status"], r["attempt"]) for r in rows) == [
        ("/in/a", "ok", 2), ("/in/b", "error", 1)
    ]
    assert key_a in data.read_state().doc_keys
    # a third attempt that still fails retryably is final
    data.commit_shard("s4", empty, _docs_with("s4", "c", status=DocStatus.ERROR, retryable=True, attempt=3))
    assert ("/in/c", "c" * 64) in data.read_state().doc_keys


def test_a_crash_between_a_retry_and_its_clean_up_is_repaired(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path))
    empty = PAGES_SCHEMA.empty_table()
    data.commit_shard("s1", empty, _docs_with("s1", "a", status=DocStatus.ERROR, retryable=True, attempt=1))
    pages, _ = _shard_tables("s2", ["a"])
    data.commit_shard("s2", pages, _docs_with("s2", "a", status=DocStatus.OK, retryable=None, attempt=2))  # no supersedes
    assert data.open_table("documents").count_rows() == 2
    data.clean()
    rows = data.open_table("documents").to_table().to_pylist()
    assert [(r["status"], r["attempt"]) for r in rows] == [("ok", 2)]


# ---- robustness of what a run resumes from (issue 13) ---------------------------------------


@pytest.mark.parametrize("record", [
    '{"generation": 1, "run_id": "r", "host": "h", "pid": 1, "acquired_at": 1, "heartbeat_at": null, "ttl_s": 60}',
    '{"generation": 1}', "[]", "not json", "",
])
def test_a_malformed_lease_is_a_stale_one_with_a_warning(tmp_path: Path, record: str, caplog) -> None:
    data = Dataset(str(tmp_path / "out"))
    (tmp_path / "out" / "_docpipe" / "lease").mkdir(parents=True)
    (tmp_path / "out" / "_docpipe" / "lease" / "000000000001.json").write_text(record)
    with caplog.at_level("WARNING"):
        lease = data.acquire("run-next")
    assert lease.generation == 2
    assert data.read_lease(1) is None
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 1


def test_owner_gone_only_where_the_owner_can_be_seen(tmp_path: Path) -> None:
    from pipeline.dataset.lease import _boot_id, _pid_namespace, _start_time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = dict(host=socket.gethostname(), boot_id=_boot_id(), pid_ns=_pid_namespace())
    base = dict(generation=1, run_id="r", acquired_at=time.time(), heartbeat_at=time.time(), ttl_s=60)
    assert LeaseInfo(**base, pid=dead.pid, **here).owner_gone()
    assert not LeaseInfo(**base, pid=os.getpid(), **here, start_time=_start_time(os.getpid())).owner_gone()
    assert LeaseInfo(**base, pid=os.getpid(), **here, start_time="1").owner_gone()  # a reused pid
    for other in ({"pid_ns": "pid:1"}, {"boot_id": "another-boot"}, {"host": "elsewhere"}, {"pid_ns": None}):
        info = LeaseInfo(**base, pid=dead.pid, **{**here, **other})
        assert not info.owner_gone() and not info.lapsed()  # the TTL decides there
        stale = LeaseInfo(**{**base, "heartbeat_at": time.time() - 120}, pid=dead.pid, **{**here, **other})
        assert stale.lapsed()


def test_a_takeover_fences_the_old_owners_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    old = data.acquire("run-old")
    data.commit_shard("s0", *_shard_tables("s0", ["z"]), lease=old)
    old_stage = out / "_docpipe" / "staging" / f"g{old.generation:012d}"
    assert old_stage.is_dir()
    _stale(data, old.generation, heartbeat_at=time.time() - 3600)
    new = Dataset(str(out)).acquire("run-new")
    Dataset(str(out)).clean(generation=new.generation)
    assert not old_stage.exists()
    # The old owner's check passed before the takeover; it stalls, then goes on with the commit:
    monkey_lease = Lease(data, old.info)
    monkey_lease.ensure = lambda: None  # type: ignore[method-assign]  # the check already happened
    with pytest.raises(LeaseLost, match="fenced off"):
        data.commit_shard("s1", *_shard_tables("s1", ["a"]), lease=monkey_lease)
    assert not data.shard_done("s1") and _files(out / "pages") == ["part-s0.parquet"]
    # The new owner commits; a documents file is never replaced once committed.
    assert data.commit_shard("s2", *_shard_tables("s2", ["b"]), lease=new)
    assert not data.commit_shard("s2", *_shard_tables("s2", ["c"]), lease=new)  # never replaced


def test_a_commit_cut_before_its_pages_moved_is_rolled_forward_by_the_next_owner(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    old = data.acquire("run-old")
    monkeypatch.setattr(Dataset, "_publish_pages", lambda self, *a, **k: (_ for _ in ()).throw(OSError(5, "killed")))
    with pytest.raises(OSError):
        data.commit_shard("s1", *_shard_tables("s1", ["a"]), lease=old)
    monkeypatch.undo()
    _stale(data, old.generation, heartbeat_at=time.time() - 3600)
    new = data.acquire("run-new")
    assert data.repair(new) == [] and _files(out / "pages") == ["part-s1.parquet"]
    assert data.verify() == []


def _damage(kind: str, out: Path) -> None:
    pages, docs, runs = out / "pages" / "part-s1.parquet", out / "documents" / "part-s1.parquet", out / "runs"
    if kind == "pages truncated":
        pages.write_bytes(pages.read_bytes()[:100])
    elif kind == "pages zeroed":
        pages.write_bytes(b"\0" * pages.stat().st_size)
    elif kind == "pages deleted":
        pages.unlink()
    elif kind == "documents truncated":
        docs.write_bytes(docs.read_bytes()[:-20])
    elif kind == "pages of another shard":  # a row count that disagrees with the documents file
        pages.write_bytes((out / "pages" / "part-s2.parquet").read_bytes())
    elif kind == "documents deleted":
        docs.unlink()
    elif kind == "runs truncated":
        (runs / "part-r1.parquet").write_bytes((runs / "part-r1.parquet").read_bytes()[:30])


@pytest.mark.parametrize("kind", ["pages truncated", "pages zeroed", "pages deleted", "documents truncated",
                                  "pages of another shard", "documents deleted", "runs truncated"])
def test_damaged_files_are_found_quarantined_and_their_documents_redone(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    lease = data.acquire("r1")
    data.commit_shard("s1", *_shard_tables("s1", ["a", "b"]), lease=lease)
    data.commit_shard("s2", *_shard_tables("s2", ["c"]), lease=lease)
    data.write_run({**_run_row("r1"), "status": "running"})
    lease.release()
    _damage(kind, out)
    found = data.verify()
    assert found and not any(p.repaired for p in found), found
    lease = data.acquire("r2")
    repaired = data.repair(lease)
    assert {p.kind for p in repaired} == {p.kind for p in found}
    assert all(p.repaired for p in repaired)
    assert data.verify() == []  # consistent now: readers and the next run see whole shards only
    quarantined = list((out / "_docpipe" / "quarantine").rglob("*.parquet"))
    assert quarantined  # moved aside, never deleted
    state = data.read_state()
    if kind != "runs truncated":
        assert state.shard_ids == {"s2"} and {u for u, _ in state.doc_keys} == {"/in/c"}  # a and b are redone
    assert open_dataset(str(out), "pages").count_rows() == 2 * len({u for u, _ in state.doc_keys})
    runs = data.read_runs()
    assert all(r["status"] == "interrupted" for r in runs)


def _run_row(run_id: str) -> dict:
    from schemas import RUNS_SCHEMA

    row = {f.name: None for f in RUNS_SCHEMA}
    row.update(run_id=run_id, status="running", started_at=datetime.now(timezone.utc), source="/in",
               config_fingerprint="fp", output_settings="{}", settings="{}", reprocess=False,
               docpipe_version="t", python_version="3", host="h")
    return row


def test_the_same_documents_committed_twice_keep_the_newer_generation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    old = data.acquire("old")
    data.commit_shard("s-old", *_shard_tables("s-old", ["a", "b"]), lease=old)
    _stale(data, old.generation, heartbeat_at=time.time() - 3600)
    new = data.acquire("new")
    data.commit_shard("s-new", *_shard_tables("s-new", ["b", "c"]), lease=new)
    (problem,) = data.repair(new)
    assert problem.kind == "shard_duplicated" and "s-old" in problem.detail
    state = data.read_state()
    assert state.shard_ids == {"s-new"}  # a (only in the stale shard) is not done: the next run redoes it
    assert {u for u, _ in state.doc_keys} == {"/in/b", "/in/c"}


def test_replayed_plans_are_checked_against_what_is_done(tmp_path: Path) -> None:
    from pipeline.planning import Shard
    from pipeline.records import DocumentRef
    from pipeline.discovery import _replayable

    data = Dataset(str(tmp_path / "out"))
    refs = [DocumentRef(f"/in/{n}", (n * 64)[:64], 1, "application/pdf") for n in "abcd"]

    def plan(shard_id: str, names: str, at: float) -> PlanRecord:
        shard = Shard(shard_id, tuple(r for r in refs if r.uri[-1] in names))
        record = PlanRecord(shard_id, "r", "fp", shard.to_dict(), at)
        data.write_plan(record)
        return record

    first, late, done_one = plan("p1", "ab", 1.0), plan("p2", "bc", 2.0), plan("p3", "d", 3.0)
    listed = refs[:3] + [DocumentRef("/in/d", "e" * 64, 1, "application/pdf")]  # d changed since its plan
    kept = _replayable([first, late, done_one], listed, frozenset(), data)
    assert [s.shard_id for s in kept] == ["p1"]  # p2 overlaps p1 (a late plan), p3's file changed
    assert set(data.plans()) == {"p1"}
    kept = _replayable([first], refs, frozenset({("/in/a", "a" * 64)}), data)
    assert kept == [] and data.plans() == {}


def test_malformed_plans_are_not_replayed_and_are_quarantined(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = Dataset(str(out))
    (out / "_docpipe" / "plans").mkdir(parents=True)
    (out / "_docpipe" / "plans" / "p1.json").write_text('{"shard_id": "p1", "shard": {"refs": 3}}')
    assert data.plans() == {}
    lease = data.acquire("r")
    assert [p.kind for p in data.repair(lease)] == ["plan_malformed"]
    assert not (out / "_docpipe" / "plans" / "p1.json").exists()


# ---- liveness does not trust another machine's clock ---------------------------------------


def _written_elsewhere(data: Dataset, generation: int, *, heartbeat_at: float, stored_at: float,
                       ttl_s: float = 60.0) -> None:
    """Make the lease record look written by a run in another PID namespace whose clock says
    `heartbeat_at`, last written into the store at `stored_at` (this machine's clock)."""
    path = data._lease_path(generation)
    info = json.loads(data.fs.cat_file(path))
    info.update(heartbeat_at=heartbeat_at, acquired_at=heartbeat_at, pid_ns="pid:1", ttl_s=ttl_s)
    data.write_bytes(path, json.dumps(info).encode())
    os.utime(path, (stored_at, stored_at))


def test_a_dead_run_whose_clock_was_hours_ahead_does_not_lock_the_output(tmp_path: Path, caplog) -> None:
    data = Dataset(str(tmp_path / "out"))
    ahead = data.acquire("run-ahead")
    _written_elsewhere(data, ahead.generation, heartbeat_at=time.time() + 3 * 3600, stored_at=time.time() - 120)
    with caplog.at_level("WARNING"):
        taken = Dataset(str(tmp_path / "out")).acquire("run-next")  # was: busy for 3 hours
    assert taken.generation == ahead.generation + 1
    (line,) = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert "dated 10800 s in the future" in line and "not trusted" in line and "written 120 s ago" in line


def test_a_record_that_stops_changing_is_stale_after_the_ttl_on_this_machines_clock(tmp_path: Path, caplog) -> None:
    data = Dataset(str(tmp_path / "out"))
    ahead = data.acquire("run-ahead")
    # It just died: the store saw its record a moment ago, its own clock says 3 hours from now.
    _written_elsewhere(data, ahead.generation, heartbeat_at=time.time() + 3 * 3600, stored_at=time.time(), ttl_s=1.0)
    with pytest.raises(OutputBusy, match=r"its heartbeat dated 10800 s ahead of this machine's clock"):
        Dataset(str(tmp_path / "out")).acquire("run-next")  # nothing can be concluded at once
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        taken = Dataset(str(tmp_path / "out")).acquire("run-next", wait_s=30)  # was: busy until the 30 s ran out
    assert taken.generation == ahead.generation + 1 and time.monotonic() - t0 < 20
    assert any("as watched on this machine's monotonic clock" in r.getMessage() for r in caplog.records)


def test_a_live_run_whose_clock_is_behind_is_not_taken_over(tmp_path: Path) -> None:
    data = Dataset(str(tmp_path / "out"))
    behind = data.acquire("run-behind")
    # Its heartbeats say an hour ago, but the store sees its record rewritten every few seconds.
    _written_elsewhere(data, behind.generation, heartbeat_at=time.time() - 3600, stored_at=time.time())
    with pytest.raises(OutputBusy, match="in use by run run-behind"):  # was: taken over while alive
        Dataset(str(tmp_path / "out")).acquire("run-other")
    assert Dataset(str(tmp_path / "out")).holder().run_id == "run-behind"


def test_the_latest_run_is_the_newest_lease_generation_not_the_latest_clock(tmp_path: Path) -> None:
    """A runs row written by a machine 3 h ahead is not "the last run" once a later run took
    the output: the settings check, the report and the README's SQL order by lease_generation."""
    from pipeline.config import RunConfig
    from pipeline.runner import SettingsChanged, check_settings
    from schemas import RUNS_SCHEMA

    out = tmp_path / "out"
    data = Dataset(str(out))
    old, new = RunConfig(source=str(tmp_path), output=str(out)), RunConfig(source=str(tmp_path), output=str(out),
                                                                            max_dpi=150)
    base = {f.name: None for f in RUNS_SCHEMA}
    now = datetime.now(timezone.utc)
    for run_id, config, generation, started in (("ahead", old, 1, now.replace(year=now.year + 1)),
                                                ("later", new, 2, now)):
        data.write_run({**base, "run_id": run_id, "status": "completed", "started_at": started, "source": "s",
                        "config_fingerprint": config.fingerprint(), "reprocess": False, "settings": "{}",
                        "output_settings": json.dumps(config.output_settings()), "docpipe_version": "x",
                        "python_version": "3", "host": "h", "lease_generation": generation})
    assert [r["run_id"] for r in data.read_runs()] == ["ahead", "later"]
    check_settings(data, new, "this-run")  # was: refused (the future-dated row was "the last run")
    with pytest.raises(SettingsChanged, match="run later"):
        check_settings(data, old, "this-run")
    latest = duckdb.sql(  # the README's query
        f"SELECT config_fingerprint FROM read_parquet('{out}/runs/*.parquet', union_by_name=true) "
        "WHERE status = 'completed' ORDER BY lease_generation DESC NULLS LAST, started_at DESC LIMIT 1").fetchall()
    assert latest == [(new.fingerprint(),)]
