"""Rows -> Arrow tables in the `schemas/` contract.

Pure: one dict per page or document in, validated Arrow tables out. Where and when the
tables land (atomic files, the commit marker, leases, what is done) is `pipeline.dataset`'s
business.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipeline.dataset import conform
from pipeline.ledger import Verdict
from pipeline.prepare.document import DocumentOutcome
from pipeline.records import PageAnswers, PageImage, StageError, TilePlan
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, TASK_USAGE_COLUMNS

# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def _error_columns(error: StageError | None) -> dict[str, Any]:
    if error is None:
        return {"error_stage": None, "error_type": None, "error_message": None, "error_retryable": None}
    return {
        "error_stage": error.stage.value,
        "error_type": error.type,
        "error_message": error.message,
        "error_retryable": error.retryable,
    }


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


def _usage_columns(answers: PageAnswers | None) -> dict[str, Any]:
    """{task}_prompt_tokens / _generated_tokens / _truncated per kind of model row (null: not run)."""
    out: dict[str, Any] = {}
    for task, _ in TASK_USAGE_COLUMNS:
        usage = answers.usage_of(task) if answers is not None else None
        out[f"{task}_prompt_tokens"] = None if usage is None else usage.prompt_tokens
        out[f"{task}_generated_tokens"] = None if usage is None else usage.generated_tokens
        out[f"{task}_truncated"] = None if usage is None else usage.hit_token_limit
    return out


def chart_check_status(answers: PageAnswers | None) -> str | None:
    """Why `has_chart` is what it is (pure; the schema's chart_check_status says each value)."""
    if answers is None:
        return None
    if answers.error is not None:
        return "failed"
    if answers.chart_check_answer is None:
        return "not_asked"
    if answers.has_chart is None:
        return "unclear"
    return "chart" if answers.has_chart else "no_chart"


def _answer_columns(answers: PageAnswers | None) -> dict[str, Any]:
    if answers is None:
        names = ("description", "ocr_text", "has_chart", "chart_check_answer", "chart_check_status", "chart_answers",
                 "model_id", "model_revision",
                 "model_dtype", "prompt_version", "prompt_tokens", "generated_tokens", "inference_latency_s",
                 "truncated", "repetitive", "ocr_source")
        return {**dict.fromkeys(names), **_usage_columns(None)}
    return {
        "description": answers.description,
        "ocr_text": answers.ocr_text,
        "has_chart": answers.has_chart,
        "chart_check_answer": answers.chart_check_answer,
        "chart_check_status": chart_check_status(answers),
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
        "ocr_source": answers.ocr_source,
        **_usage_columns(answers),
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
    processed_at: datetime | None = None,
) -> dict[str, Any]:
    """One row of the pages table. `error` (or else `answers.error`) makes the status 'error'.
    `processed_at` (timezone-aware) defaults to now."""
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
        "processed_at": (processed_at or datetime.now(timezone.utc)).astimezone(timezone.utc),
        "run_id": run_id,
        "config_fingerprint": fingerprint,
    }
    return {name: row[name] for name in PAGES_SCHEMA.names}


def document_row(
    outcome: DocumentOutcome,
    verdict: Verdict,
    *,
    shard_id: str,
    run_id: str,
    fingerprint: str,
    processed_at: datetime,
) -> dict[str, Any]:
    """One row of the documents table: the ledger's `verdict` (status, error, page counts) on
    the document preparation reported (`outcome`). `processed_at` must be timezone-aware."""
    if processed_at.tzinfo is None or processed_at.utcoffset() is None:
        raise ValueError("processed_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    ref, timings = outcome.ref, outcome.timings
    row: dict[str, Any] = {
        "doc_id": ref.doc_id,
        "source_uri": ref.uri,
        "size_bytes": ref.size,
        "media_type": ref.media_type,
        "page_count": outcome.page_count,
        "pages_ok": verdict.pages_ok,
        "pages_failed": verdict.pages_failed,
        "status": verdict.status.value,
        "duplicate_of": ref.duplicate_of,
        "replaces_doc_id": ref.replaces,
        "source_version": ref.version,
        "source_etag": ref.etag,
        "source_mtime": None if ref.mtime is None else datetime.fromtimestamp(ref.mtime, timezone.utc),
        **_error_columns(verdict.error if verdict.error is not None else ref.error),
        "attempt": outcome.attempt,
        "open_note": outcome.open_note,
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
    return conform(table, schema)
