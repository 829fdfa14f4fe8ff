"""sink: rows in the schema (the helpers here also build shards for tests/dataset/test_dataset.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.ledger import Verdict
from pipeline.prepare import DocumentOutcome
from pipeline.records import (
    ChartAnswer,
    DocStatus,
    DocTimings,
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
from pipeline.sink import document_row, page_row, rows_to_table
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA

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
    return DocumentOutcome(ref=ref, page_count=2, pages_ok=pages_ok, timings=timings)


def _verdict(outcome: DocumentOutcome, status: DocStatus) -> Verdict:
    """A ledger verdict of `status` on `outcome`'s facts, for building rows in tests."""
    error = outcome.error
    return Verdict(status, error, outcome.pages_ok, outcome.pages_failed, keep_pages=True,
                   final=error is None or not error.retryable)


def _shard_tables(
    shard_id: str, names: list[str], statuses: dict[str, DocStatus] | None = None
) -> tuple[pa.Table, pa.Table]:
    statuses = statuses or {}
    page_rows, doc_rows = [], []
    for name in names:
        status = statuses.get(name, DocStatus.OK)
        outcome = _doc(name, status)
        doc_rows.append(document_row(outcome, _verdict(outcome, status), shard_id=shard_id, processed_at=WHEN, **COMMON))
        if status is DocStatus.DUPLICATE:
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
    verdict = _verdict(outcome, DocStatus.ERROR)
    row = document_row(outcome, verdict, shard_id="s", processed_at=WHEN.astimezone(timezone(timedelta(hours=2))),
                       **COMMON)
    assert list(row) == DOCUMENTS_SCHEMA.names
    assert (row["status"], row["error_stage"], row["error_type"]) == ("error", "sources", "mislabelled")
    assert row["page_count"] is None and row["size_bytes"] == 1234
    assert row["processed_at"] == WHEN and row["processed_at"].utcoffset() == timedelta(0)
    assert (row["rasterize_s"], row["tiling_s"], row["inference_s"], row["total_s"]) == (0.2, 0.3, 0.4, 1.0)
    copy = _doc("y", DocStatus.DUPLICATE, duplicate_of="/in/first.pdf")
    dup = document_row(copy, _verdict(copy, DocStatus.DUPLICATE), shard_id="s", processed_at=WHEN, **COMMON)
    assert (dup["status"], dup["duplicate_of"], dup["error_type"]) == ("duplicate", "/in/first.pdf", None)
    with pytest.raises(ValueError, match="timezone"):
        document_row(outcome, verdict, shard_id="s", processed_at=datetime(2026, 1, 1), **COMMON)


def test_rows_to_table_checks_rows() -> None:
    empty = rows_to_table([], PAGES_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(PAGES_SCHEMA, check_metadata=True)
    ok = _doc("a")
    row = document_row(ok, _verdict(ok, DocStatus.OK), shard_id="s", processed_at=WHEN, **COMMON)
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


def test_chart_check_status_says_why_has_chart_is_what_it_is() -> None:
    import dataclasses

    from pipeline.sink import chart_check_status

    base = _answers()
    cases = {
        "chart": dataclasses.replace(base, has_chart=True, chart_check_answer="Yes."),
        "no_chart": dataclasses.replace(base, has_chart=False, chart_check_answer="no"),
        "unclear": dataclasses.replace(base, has_chart=None, chart_check_answer="a table of figures"),
        "not_asked": dataclasses.replace(base, has_chart=None, chart_check_answer=None),
        "failed": _answers(error=StageError(Stage.INFERENCE, "out_of_memory", "OOM")),
    }
    for status, answers in cases.items():
        assert chart_check_status(answers) == status
        row = page_row(doc_id="d", source_uri="u", page_number=1, page=_page("d", "u", 1), plan=_plan(),
                       answers=answers, error=None, shard_id="s", **COMMON)
        assert row["chart_check_status"] == status
    assert chart_check_status(None) is None  # no model ran for the page
