"""sink: rows in the schema, Parquet round trips, atomic shard writes, resume state, S3."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import (
    ChartAnswer,
    DocStatus,
    DocTimings,
    DocumentOutcome,
    DocumentRef,
    PageAnswers,
    PageImage,
    PageKind,
    RenderInfo,
    Stage,
    StageError,
    TileBox,
    TilePlan,
)
from pipeline.sink import (
    DoneState,
    clean_orphans,
    document_row,
    open_dataset,
    page_row,
    read_done,
    rows_to_table,
    shard_done,
    write_shard,
)
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, SCHEMA_VERSION, VERSION_KEY

WHEN = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
COMMON = {"run_id": "run-1", "fingerprint": "f" * 16}


def _page(doc_id: str, uri: str, number: int, text: str | None = "Hello page") -> PageImage:
    return PageImage(
        doc_id=doc_id,
        uri=uri,
        page_number=number,
        image=Image.new("RGB", (17, 22)),
        render=RenderInfo(1700, 2200, 200.0, requested_dpi=220.0, downscaled=True, note="pixel budget"),
        kind=PageKind.BORN_DIGITAL,
        text=text,
        rotation=90,
    )


def _plan() -> TilePlan:
    boxes = tuple(TileBox(c * 448, r * 448, (c + 1) * 448, (r + 1) * 448) for r in range(4) for c in range(3))
    return TilePlan("internvl", 3, 4, 448, 448, 1344, 1792, boxes, True, (448, 448), 256)


def _answers(error: StageError | None = None) -> PageAnswers:
    return PageAnswers(
        model_id="tiny/internvl",
        model_revision="abc123",
        model_dtype="float32",
        prompt_version="p1",
        description="A page with a bar chart.",
        ocr_text="Hello page",
        has_chart=True,
        chart_answers=(ChartAnswer("What type of chart?", "bar"), ChartAnswer("Title?", None)),
        prompt_tokens=3400,
        generated_tokens=120,
        latency_s=0.5,
        truncated=True,
        repetitive=False,
        error=error,
    )


def _doc(name: str, status: DocStatus = DocStatus.OK, **ref_kwargs) -> DocumentOutcome:
    ref = DocumentRef(uri=f"/in/{name}", doc_id=(name * 64)[:64], size=1234, media_type="application/pdf", **ref_kwargs)
    pages_ok = 2 if status is DocStatus.OK else 0
    timings = DocTimings(0.1, 0.2, 0.3, 0.4, 1.0)
    return DocumentOutcome(ref=ref, status=status, page_count=2, pages_ok=pages_ok, timings=timings)


def _shard_tables(
    shard_id: str, names: list[str], statuses: dict[str, DocStatus] | None = None
) -> tuple[pa.Table, pa.Table]:
    statuses = statuses or {}
    page_rows, doc_rows = [], []
    for name in names:
        outcome = _doc(name, statuses.get(name, DocStatus.OK))
        doc_rows.append(document_row(outcome, shard_id=shard_id, processed_at=WHEN, **COMMON))
        if outcome.status is DocStatus.DUPLICATE:
            continue
        for number in (1, 2):
            page_rows.append(
                page_row(doc_id=outcome.ref.doc_id, source_uri=outcome.ref.uri, page_number=number,
                         page=_page(outcome.ref.doc_id, outcome.ref.uri, number), plan=_plan(), answers=_answers(),
                         error=None, shard_id=shard_id, **COMMON)
            )
    return rows_to_table(page_rows, PAGES_SCHEMA), rows_to_table(doc_rows, DOCUMENTS_SCHEMA)


def _canonical(schema: pa.Schema) -> pa.Schema:
    """`schema` with list element fields named alike: Parquet-compliant files read back as
    list<element: ...> where pyarrow builds list<item: ...>; nothing else may differ."""

    def field(f: pa.Field) -> pa.Field:
        if not pa.types.is_list(f.type):
            return f
        value = f.type.value_field
        return f.with_type(pa.list_(pa.field("item", value.type, value.nullable, value.metadata)))

    return pa.schema([field(f) for f in schema], metadata=schema.metadata)


def _same_schema(actual: pa.Schema, expected: pa.Schema) -> bool:
    return _canonical(actual).equals(_canonical(expected), check_metadata=True)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- rows --------------------------------------------------------------------------------


def test_page_row_fields() -> None:
    row = page_row(doc_id="d", source_uri="/in/a.pdf", page_number=3, page=_page("d", "/in/a.pdf", 3),
                   plan=_plan(), answers=_answers(), error=None, shard_id="s1", **COMMON)
    assert list(row) == PAGES_SCHEMA.names
    assert row["status"] == "ok" and row["error_stage"] is None
    assert (row["page_kind"], row["width_px"], row["height_px"], row["dpi"], row["requested_dpi"]) == (
        "born_digital", 1700, 2200, 200.0, 220.0)
    assert (row["downscaled"], row["render_note"], row["rotation"]) == (True, "pixel budget", 90)
    assert (row["tiling_policy"], row["grid_cols"], row["grid_rows"]) == ("internvl", 3, 4)
    assert (row["tile_count"], row["has_thumbnail"], row["visual_tokens"]) == (13, True, 13 * 256)
    assert (row["text_layer"], row["text_layer_chars"]) == ("Hello page", 10)
    assert row["chart_answers"] == [{"question": "What type of chart?", "answer": "bar"},
                                    {"question": "Title?", "answer": None}]
    assert (row["model_id"], row["prompt_tokens"], row["inference_latency_s"], row["truncated"]) == (
        "tiny/internvl", 3400, 0.5, True)
    assert (row["shard_id"], row["run_id"], row["config_fingerprint"]) == ("s1", "run-1", "f" * 16)


def test_page_row_without_model_or_text_layer() -> None:
    row = page_row(doc_id="d", source_uri="u", page_number=1, page=_page("d", "u", 1, text=None),
                   plan=_plan(), answers=None, error=None, shard_id="s", **COMMON)
    assert row["text_layer"] is None and row["text_layer_chars"] is None
    assert row["chart_answers"] is None and row["model_id"] is None and row["description"] is None
    empty_text = page_row(doc_id="d", source_uri="u", page_number=1, page=_page("d", "u", 1, text=""),
                          plan=None, answers=None, error=None, shard_id="s", **COMMON)
    assert empty_text["text_layer_chars"] == 0 and empty_text["tile_count"] is None


def test_page_row_errors() -> None:
    failed = page_row(doc_id="d", source_uri="u", page_number=4, page=None, plan=None, answers=None,
                      error=StageError(Stage.RASTERIZE, "render_failed", "boom"), shard_id="s", **COMMON)
    assert (failed["status"], failed["error_stage"], failed["error_type"], failed["error_message"]) == (
        "error", "rasterize", "render_failed", "boom")
    assert failed["page_kind"] is None and failed["width_px"] is None and failed["tiling_policy"] is None
    oom = StageError(Stage.INFERENCE, "out_of_memory", "CUDA OOM at batch 1")
    model_failed = page_row(doc_id="d", source_uri="u", page_number=1, page=_page("d", "u", 1), plan=_plan(),
                            answers=_answers(error=oom), error=None, shard_id="s", **COMMON)
    assert (model_failed["status"], model_failed["error_stage"], model_failed["error_type"]) == (
        "error", "inference", "out_of_memory")
    both = page_row(doc_id="d", source_uri="u", page_number=1, page=None, plan=None, answers=_answers(error=oom),
                    error=StageError(Stage.TILING, "bad_size", "0 px"), shard_id="s", **COMMON)
    assert both["error_stage"] == "tiling"  # the page's own error wins over the model's


def test_document_row_fields() -> None:
    source_error = StageError(Stage.SOURCES, "mislabelled", "named .pdf but content is text/html")
    outcome = _doc("x", DocStatus.ERROR, error=source_error)
    outcome.page_count = None
    row = document_row(outcome, shard_id="s", processed_at=WHEN.astimezone(timezone(timedelta(hours=2))), **COMMON)
    assert list(row) == DOCUMENTS_SCHEMA.names
    assert (row["status"], row["error_stage"], row["error_type"]) == ("error", "sources", "mislabelled")
    assert row["page_count"] is None and row["size_bytes"] == 1234
    assert row["processed_at"] == WHEN and row["processed_at"].utcoffset() == timedelta(0)
    assert (row["rasterize_s"], row["tiling_s"], row["inference_s"], row["total_s"]) == (0.2, 0.3, 0.4, 1.0)
    dup = document_row(_doc("y", DocStatus.DUPLICATE, duplicate_of="/in/first.pdf"), shard_id="s",
                       processed_at=WHEN, **COMMON)
    assert (dup["status"], dup["duplicate_of"], dup["error_type"]) == ("duplicate", "/in/first.pdf", None)
    with pytest.raises(ValueError, match="timezone"):
        document_row(outcome, shard_id="s", processed_at=datetime(2026, 1, 1), **COMMON)


def test_rows_to_table_checks_rows() -> None:
    empty = rows_to_table([], PAGES_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(PAGES_SCHEMA, check_metadata=True)
    row = document_row(_doc("a"), shard_id="s", processed_at=WHEN, **COMMON)
    table = rows_to_table([row], DOCUMENTS_SCHEMA)
    assert table.schema.equals(DOCUMENTS_SCHEMA, check_metadata=True) and table.to_pylist() == [row]
    with pytest.raises(ValueError, match="missing \\['run_id'\\]"):
        rows_to_table([{k: v for k, v in row.items() if k != "run_id"}], DOCUMENTS_SCHEMA)
    with pytest.raises(ValueError, match="unexpected \\['typo'\\]"):
        rows_to_table([{**row, "typo": 1}], DOCUMENTS_SCHEMA)
    with pytest.raises(ValueError, match="'shard_id' must not be null"):
        rows_to_table([{**row, "shard_id": None}], DOCUMENTS_SCHEMA)
    with pytest.raises(pa.ArrowInvalid):
        rows_to_table([{**row, "pages_ok": "many"}], DOCUMENTS_SCHEMA)


# ---- writing and reading -----------------------------------------------------------------


def test_round_trip_keeps_schema_and_metadata(tmp_path: Path) -> None:
    pages, documents = _shard_tables("s1", ["a", "b"])
    write_shard(str(tmp_path), "s1", pages, documents)
    for folder, table, schema in (("pages", pages, PAGES_SCHEMA), ("documents", documents, DOCUMENTS_SCHEMA)):
        path = tmp_path / folder / "part-s1.parquet"
        back = pq.read_table(path)
        assert _same_schema(back.schema, schema)
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
    assert state.doc_ids_with_pages == frozenset((n * 64)[:64] for n in "acd")


# ---- atomicity ---------------------------------------------------------------------------


def _crash_on_write(monkeypatch: pytest.MonkeyPatch, crash_on_call: int) -> list[str]:
    """Make the n-th Parquet write (1-based) die after writing half its bytes.

    Returns the names in the target folder at the moment of the crash: what a reader
    would see, and what would stay behind if the process were killed there.
    """
    real_write = pq.write_table
    calls: list[int] = []
    seen_at_crash: list[str] = []

    def flaky_write(table, where, **kwargs):
        calls.append(1)
        if len(calls) != crash_on_call:
            return real_write(table, where, **kwargs)
        buffer = pa.BufferOutputStream()
        real_write(table, buffer, **kwargs)
        data = buffer.getvalue().to_pybytes()
        if isinstance(where, str):
            with open(where, "wb") as fh:
                fh.write(data[: len(data) // 2])
            seen_at_crash.extend(sorted(os.listdir(os.path.dirname(where))))
        else:
            where.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", flaky_write)
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


def test_crash_while_writing_documents_leaves_an_orphan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard(str(tmp_path), "s1", *_shard_tables("s1", ["a"]))
    before = read_done(str(tmp_path))
    seen = _crash_on_write(monkeypatch, crash_on_call=2)
    with pytest.raises(OSError):
        write_shard(str(tmp_path), "s2", *_shard_tables("s2", ["b"]))
    assert "part-s2.parquet" not in seen and any(n.startswith(".part-s2.parquet.tmp-") for n in seen)
    assert _files(tmp_path / "pages") == ["part-s1.parquet", "part-s2.parquet"]
    assert _files(tmp_path / "documents") == ["part-s1.parquet"]  # no half file, no temp file
    assert read_done(str(tmp_path)) == before
    assert shard_done(str(tmp_path), "s1") and not shard_done(str(tmp_path), "s2")
    assert open_dataset(str(tmp_path), "pages").count_rows() == 2  # the orphan is not visible
    assert clean_orphans(str(tmp_path)) == [str(tmp_path / "pages" / "part-s2.parquet")]
    assert _files(tmp_path / "pages") == ["part-s1.parquet"]


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


def test_clean_orphans(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert clean_orphans(str(out)) == []  # nothing there yet
    write_shard(str(out), "s1", *_shard_tables("s1", ["a"]))
    orphan = out / "pages" / "part-s9.parquet"
    orphan.write_bytes((out / "pages" / "part-s1.parquet").read_bytes())
    temp_pages = out / "pages" / ".part-s7.parquet.tmp-abc"
    temp_docs = out / "documents" / ".part-s7.parquet.tmp-def"
    temp_pages.write_bytes(b"partial")
    temp_docs.write_bytes(b"partial")
    assert read_done(str(out)).shard_ids == {"s1"}

    # Fresh files are kept when an age is asked for (a writer may still be at work).
    assert clean_orphans(str(out), older_than_s=3600) == []
    old = datetime.now().timestamp() - 7200
    os.utime(orphan, (old, old))
    assert clean_orphans(str(out), older_than_s=3600) == [str(orphan)]

    removed = clean_orphans(str(out))
    assert sorted(removed) == sorted([str(temp_pages), str(temp_docs)])
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
    assert state.doc_ids_with_pages == frozenset((n * 64)[:64] for n in "ac")
    fs = fsspec.filesystem("s3", **s3_storage_options)
    with fs.open(f"{s3_bucket}/out/pages/part-s1.parquet", "rb") as fh:
        back = pq.read_table(fh)
    assert _same_schema(back.schema, PAGES_SCHEMA) and back.to_pylist() == pages.to_pylist()
    assert open_dataset(url, "pages", s3_storage_options).count_rows() == 4
    assert open_dataset(url, "documents", s3_storage_options).count_rows() == 3

    fs.pipe_file(f"{s3_bucket}/out/pages/part-s9.parquet", b"orphan")
    assert clean_orphans(url, s3_storage_options) == [f"{url}/pages/part-s9.parquet"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/pages", refresh=True)) == [
        "part-s1.parquet", "part-s2.parquet"
    ]


def test_read_done_knows_files_by_version_and_reads_older_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sink import read_done
    from schemas import DOCUMENTS_SCHEMA

    docs = tmp_path / "out" / "documents"
    docs.mkdir(parents=True)
    row = {f.name: None for f in DOCUMENTS_SCHEMA}
    row.update(
        doc_id="d1", source_uri="/in/a.pdf", size_bytes=10, media_type="application/pdf", pages_ok=1,
        pages_failed=0, status="ok", source_version="mtime:1.0", shard_id="s1", run_id="r", config_fingerprint="f",
        processed_at=datetime.now(timezone.utc),
    )
    pq.write_table(pa.Table.from_pylist([row], schema=DOCUMENTS_SCHEMA), docs / "part-s1.parquet")
    # a file from before source_version existed: the column is simply missing
    old_schema = pa.schema([f for f in DOCUMENTS_SCHEMA if f.name != "source_version"])
    old = {k: v for k, v in row.items() if k != "source_version"} | {"doc_id": "d2", "source_uri": "/in/b.pdf"}
    pq.write_table(pa.Table.from_pylist([old], schema=old_schema), docs / "part-s2.parquet")

    done = read_done(str(tmp_path / "out"))
    assert done.doc_keys == {("/in/a.pdf", "d1"), ("/in/b.pdf", "d2")}
    assert set(done.known) == {"/in/a.pdf"}  # b has no version recorded: it will be read again
    assert done.known["/in/a.pdf"].doc_id == "d1" and done.known["/in/a.pdf"].version == "mtime:1.0"
