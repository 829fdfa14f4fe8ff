"""The report's data: what an output (or one of its runs) holds, read narrow, and the pure
summaries of it (the gallery's choice, counts, errors with examples, the header's figures)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.dataset as pads

from pipeline.dataset import DOCUMENTS, PAGES, Dataset

DEFAULT_SAMPLE = 48  # pages in the gallery besides the error pages
MAX_ERROR_PAGES = 500  # error pages beyond this are counted, not shown (keeps the file small)


class ReportError(RuntimeError):
    """The report cannot be made (no runs in the output, unknown run id)."""


@dataclass(frozen=True, slots=True)
class RunData:
    """What a report shows: a run's row (the latest run for the whole output), the
    documents rows and the narrow page rows (SLIM_PAGE_COLUMNS) in scope, and every run."""

    run: dict[str, Any]
    documents: list[dict[str, Any]]
    pages: list[dict[str, Any]]
    output: str
    runs: tuple[dict[str, Any], ...] = ()
    scope: str = "run"  # "run": one run's rows; "output": the latest rows of the whole output


@dataclass(frozen=True, slots=True)
class RunSummaryView:
    """The figures at the top of the page."""

    documents_by_status: dict[str, int]
    pages_by_status: dict[str, int]
    pages_by_kind: dict[str, int]
    errors: list[dict[str, Any]]  # {type, stage, level, count, examples: [(source, message)]}
    seconds: float | None
    pages_per_s: float | None
    generated_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)


# The page columns read for every page (counts, plots, the gallery's choice, error examples);
# the others (text, answers) only for the pages the gallery shows.
SLIM_PAGE_COLUMNS = (
    "doc_id", "source_uri", "page_number", "status", "error_stage", "error_type", "error_message", "page_kind",
    "generated_tokens", "model_dtype", "shard_id", "processed_at", "run_id",
)


def _columns(table: Any, wanted: Sequence[str]) -> list[str]:
    names = set(table.schema.names)
    return [c for c in wanted if c in names]

def load_run(output: str, run_id: str | None = None, storage_options: Mapping[str, Any] | None = None) -> RunData:
    """The run `run_id` with its committed rows, or (None) the whole output's latest rows."""
    dataset = Dataset(output, storage_options)
    runs = dataset.read_runs()
    if not runs:
        raise ReportError(f"{output} has no runs table: is it a docpipe output?")
    committed = bool(dataset.part_files(DOCUMENTS))
    if run_id is None:
        docs = dataset.open_table(DOCUMENTS).to_table().to_pylist() if committed else []
        pages = []
        if committed:
            table = dataset.open_table(PAGES)
            pages = table.to_table(columns=_columns(table, SLIM_PAGE_COLUMNS)).to_pylist()
        docs, pages = latest_rows(docs, pages)
        return RunData(run=runs[-1], documents=docs, pages=pages, output=output, runs=tuple(runs), scope="output")
    matches = [r for r in runs if r["run_id"] == run_id]
    if not matches:
        known = ", ".join(r["run_id"] for r in runs[-5:])
        raise ReportError(f"no run {run_id!r} in {output} (latest: {known})")
    run = matches[-1]
    where = pads.field("run_id") == run["run_id"]
    docs = dataset.open_table(DOCUMENTS).to_table(filter=where).to_pylist() if committed else []
    pages = []
    if committed:
        table = dataset.open_table(PAGES)
        pages = table.to_table(filter=where, columns=_columns(table, SLIM_PAGE_COLUMNS)).to_pylist()
    return RunData(run=run, documents=docs, pages=pages, output=output, runs=tuple(runs), scope="run")

def _stamp(row: Mapping[str, Any]) -> Any:
    stamp = row.get("processed_at")
    return (stamp is not None, stamp or 0)

def latest_rows(
    documents: Sequence[dict[str, Any]], pages: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output's current state (pure): the latest documents row of each source, and the
    latest row of each page of that document version (a rerun's answers replace older
    ones; a changed source's old pages are left out)."""
    docs: dict[str, dict[str, Any]] = {}
    for row in documents:
        key = str(row["source_uri"])
        if key not in docs or _stamp(row) >= _stamp(docs[key]):
            docs[key] = row
    current = {(uri, d.get("doc_id")) for uri, d in docs.items()}
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for row in pages:
        if (row["source_uri"], row.get("doc_id")) not in current:
            continue
        key = (str(row["source_uri"]), int(row["page_number"]))
        if key not in kept or _stamp(row) >= _stamp(kept[key]):
            kept[key] = row
    return sorted(docs.values(), key=lambda d: str(d["source_uri"])), sorted(
        kept.values(), key=lambda p: (str(p["source_uri"]), int(p["page_number"])))

def load_full_pages(
    output: str, chosen: Sequence[Mapping[str, Any]], storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every column of the `chosen` page rows (matched by source, page, run and shard), in their order."""
    if not chosen:
        return []
    import pyarrow.compute as pc

    dataset = Dataset(output, storage_options)
    sources = sorted({str(p["source_uri"]) for p in chosen})
    rows = dataset.open_table(PAGES).to_table(filter=pc.field("source_uri").isin(sources)).to_pylist()
    index = {(r["source_uri"], r["page_number"], r.get("run_id"), r.get("shard_id"), r.get("processed_at")): r
             for r in rows}
    out = []
    for p in chosen:
        key = (p["source_uri"], p["page_number"], p.get("run_id"), p.get("shard_id"), p.get("processed_at"))
        out.append(index.get(key, dict(p)))
    return out


def _stable_key(page: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{page['source_uri']}\0{page['page_number']}".encode()).hexdigest()

def is_error_page(page: Mapping[str, Any]) -> bool:
    return page.get("status") not in ("ok", None) or bool(page.get("error_type"))

def select_gallery(
    pages: Sequence[Mapping[str, Any]], sample: int = DEFAULT_SAMPLE, max_errors: int = MAX_ERROR_PAGES
) -> tuple[list[Mapping[str, Any]], int]:
    """The pages shown: every error page (up to `max_errors`), then up to `sample` others.

    The others are picked by a hash of (source, page), so the same run gives the same
    gallery and the picks spread over the run instead of its first documents. Returns the
    pages, errors first (the pages to fix), each group in source order, and how many
    error pages were left out.
    """
    errors = [p for p in pages if is_error_page(p)]
    others = [p for p in pages if not is_error_page(p)]
    shown_errors = sorted(errors, key=_stable_key)[:max_errors]
    picked = sorted(others, key=_stable_key)[: max(sample, 0)]
    def in_source_order(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return sorted(rows, key=lambda p: (p["source_uri"], p["page_number"]))

    return in_source_order(shown_errors) + in_source_order(picked), len(errors) - len(shown_errors)

def _seconds(run: Mapping[str, Any]) -> float | None:
    start, end = run.get("started_at"), run.get("ended_at")
    if isinstance(start, datetime) and isinstance(end, datetime):
        return max((end - start).total_seconds(), 0.0)
    return None

def summarize_run(data: RunData) -> RunSummaryView:
    """Counts, errors with example messages, pages/s and settings for the header."""
    errors: dict[tuple[str, str, str], dict[str, Any]] = {}
    for level, rows in (("document", data.documents), ("page", data.pages)):
        for row in rows:
            if not row.get("error_type"):
                continue
            key = (level, str(row["error_type"]), str(row.get("error_stage") or ""))
            entry = errors.setdefault(key, {"level": level, "type": key[1], "stage": key[2], "count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < 3:
                where = row["source_uri"] + (f" p.{row['page_number']}" if level == "page" else "")
                entry["examples"].append((where, row.get("error_message") or ""))
    seconds = _seconds(data.run) if data.scope == "run" else None
    pages = len(data.pages)
    try:
        settings = json.loads(data.run.get("settings") or "{}")
    except ValueError:
        settings = {}
    return RunSummaryView(
        documents_by_status=dict(Counter(str(d.get("status")) for d in data.documents).most_common()),
        pages_by_status=dict(Counter(str(p.get("status")) for p in data.pages).most_common()),
        pages_by_kind=dict(Counter(str(p.get("page_kind") or "unknown") for p in data.pages).most_common()),
        errors=sorted(errors.values(), key=lambda e: (-e["count"], e["type"])),
        seconds=seconds,
        pages_per_s=(pages / seconds) if seconds else None,
        generated_tokens=sum(int(p.get("generated_tokens") or 0) for p in data.pages),
        settings=settings if isinstance(settings, dict) else {},
    )
