"""`docpipe report`: one self-contained HTML page about an output, or about one run of it.

Without `--run` the page is the output as a whole: documents and pages by status over
all runs (the latest row of each document and page: a rerun's answers replace older
ones), the runs table, the errors to fix first, and a gallery; so a nightly rerun that had
nothing new still shows what the output holds. `--run ID` shows that run's own rows.
To stay fast at 100k pages only a few narrow columns of every page are read (counts,
plots and the gallery's choice come from them); the wide text columns are read for the
sampled gallery pages alone.

People judge extraction by putting a page beside what was extracted from it, so the page
has a gallery (a thumbnail rendered from the source beside its text layer, OCR text,
description, chart answers and flags) under a summary (counts by status, errors with
their messages, pages/s, model and settings from the runs table) and a few small plots.
Everything is inline: CSS in the page, plots and thumbnails as data URIs, no script and
no request to anywhere, so the file can be mailed, attached or opened offline.

The shape: `load_run` and `render_thumbnails` read (the output's committed tables, the
source files); `select_gallery`, `summarize_run`, the `plot_*` functions and
`build_html` are pure (rows in, bytes or text out); `write_report` joins them.
Plots are drawn by matplotlib (Agg, no pyplot state); thumbnails by PyMuPDF (PDF pages,
rotation applied) and Pillow (scans, EXIF orientation applied, one frame per page).

The package: `data.py` (reading the output, the pure summaries), `thumbnails.py`,
`plots.py`, `html.py` (the template and the cards); this module joins them.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.report.data import (
    DEFAULT_SAMPLE,
    ReportError,
    RunData,
    latest_rows,
    load_full_pages,
    load_run,
    select_gallery,
    summarize_run,
)
from pipeline.report.html import build_html, gallery_cards
from pipeline.report.markdown import md_block, md_code
from pipeline.report.plots import make_plots, shard_progress
from pipeline.report.thumbnails import (
    THUMB_TIMEOUT_S,
    ThumbLimits,
    Thumbnail,
    render_thumbnail,
    render_thumbnails,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReportResult:
    run_id: str  # the run shown, or the latest run for the whole output
    html: str
    gallery_pages: int
    pages: int
    scope: str = "run"
    runs: int = 1


REPORT_TIMEOUT_S = 120.0  # all thumbnails of one report at most (each: thumbnails.THUMB_TIMEOUT_S)


def make_report(
    output: str,
    run_id: str | None = None,
    *,
    sample: int = DEFAULT_SAMPLE,
    storage_options: Mapping[str, Any] | None = None,
    timeout_s: float | None = REPORT_TIMEOUT_S,
) -> ReportResult:
    """Read the run, render its sampled pages and plots, and assemble the page. Thumbnails
    stop `timeout_s` after the start (the cards left say so); each takes at most
    THUMB_TIMEOUT_S, and never more than the run's own document timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    data = load_run(output, run_id, storage_options)
    summary = summarize_run(data)
    chosen, left_out = select_gallery(data.pages, sample)
    chosen = load_full_pages(output, chosen, storage_options)  # the wide columns, for the shown pages only
    media = {str(d["source_uri"]): str(d.get("media_type") or "") for d in data.documents}
    limits = ThumbLimits(per_thumb_s=min(THUMB_TIMEOUT_S, _run_timeout(summary.settings)), deadline=deadline)
    thumbs = render_thumbnails(chosen, media, storage_options, limits=limits)
    html = build_html(data, summary, make_plots(data, summary), gallery_cards(chosen, thumbs),
                      sample=sample, errors_left_out=left_out)
    return ReportResult(run_id=str(data.run["run_id"]), html=html, gallery_pages=len(chosen), pages=len(data.pages),
                        scope=data.scope, runs=len(data.runs))

def _run_timeout(settings: Mapping[str, Any]) -> float:
    """The run's document timeout from its recorded settings (a thumbnail never gets longer)."""
    try:
        value = float(settings.get("document_timeout_s") or THUMB_TIMEOUT_S)
    except (TypeError, ValueError):
        return THUMB_TIMEOUT_S
    return value if value > 0 else THUMB_TIMEOUT_S


def write_report(
    output: str,
    destination: str,
    run_id: str | None = None,
    *,
    sample: int = DEFAULT_SAMPLE,
    storage_options: Mapping[str, Any] | None = None,
    timeout_s: float | None = REPORT_TIMEOUT_S,
) -> ReportResult:
    """`make_report`, written to `destination` (a local path or any fsspec URL)."""
    import fsspec

    result = make_report(output, run_id, sample=sample, storage_options=storage_options, timeout_s=timeout_s)
    remote = "://" in destination and not destination.startswith("file://")
    with fsspec.open(destination, "w", encoding="utf-8", **(dict(storage_options or {}) if remote else {})) as fh:
        fh.write(result.html)
    return result

def report_path(output: str, run_id: str) -> str:
    """Where a flow run leaves its report: beside the output's metadata."""
    from pipeline.dataset import META

    return f"{output.rstrip('/')}/{META}/reports/{run_id}.html"

def publish_markdown(
    output: str, run_id: str, storage_options: Mapping[str, Any] | None = None, *, shown_output: str | None = None,
    timeout_s: float | None = REPORT_TIMEOUT_S,
) -> str:
    """Write the run's report into the output and return a markdown note for Prefect saying
    where it is; a report that cannot be made is a line of the note, never a failed run.
    Its thumbnails stop after `timeout_s` (the flow's report step passes its own)."""
    destination = report_path(output, run_id)
    shown = shown_output or output  # what the note may show (no credentials in the URL)
    shown_dest = report_path(shown, run_id)
    try:
        result = write_report(output, destination, run_id, storage_options=storage_options, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the run's rows are committed; the report is extra
        log.warning("could not write the report of run %s (%s)", run_id, exc)
        return (f"The report of run {md_code(run_id)} could not be written ({type(exc).__name__}). Make it with\n\n"
                + md_block(f"docpipe report {shlex.quote(shown)} --run {shlex.quote(run_id)} --html report.html"))
    command = f"docpipe report {shlex.quote(shown)} --run {shlex.quote(run_id)} --html report.html"
    return (f"## docpipe run {md_code(run_id)}: report\n\nA self-contained HTML page (summary, plots, a gallery of "
            f"{result.gallery_pages} of {result.pages} pages beside their extracted text) is at\n\n"
            f"{md_code(shown_dest)}\n\nOpen it in a browser (download it first from a bucket), or make another with "
            f"{md_code(command)}.\n")


__all__ = [
    "ReportError",
    "ReportResult",
    "RunData",
    "REPORT_TIMEOUT_S",
    "ThumbLimits",
    "Thumbnail",
    "build_html",
    "gallery_cards",
    "latest_rows",
    "load_run",
    "make_report",
    "publish_markdown",
    "render_thumbnail",
    "select_gallery",
    "shard_progress",
    "summarize_run",
    "write_report",
]
