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
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.dataset as pads

from pipeline.dataset import DOCUMENTS, PAGES, Dataset

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 48  # pages in the gallery besides the error pages
MAX_ERROR_PAGES = 500  # error pages beyond this are counted, not shown (keeps the file small)
THUMB_PX = 360  # longest side of a thumbnail
TEXT_LIMIT = 3000  # characters of each text field shown per page
FLAG_COLUMNS = ("truncated", "repetitive", "downscaled", "has_chart", "ocr_source")


class ReportError(RuntimeError):
    """The report cannot be made (no runs in the output, unknown run id)."""


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


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
class Thumbnail:
    """A rendered page (JPEG bytes), or why it could not be rendered."""

    data: bytes | None = None
    width: int = 0
    height: int = 0
    note: str | None = None


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


# ---------------------------------------------------------------------------------------
# Reading (I/O)
# ---------------------------------------------------------------------------------------


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


def render_thumbnails(
    pages: Sequence[Mapping[str, Any]],
    media_types: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    max_px: int = THUMB_PX,
) -> dict[tuple[str, int], Thumbnail]:
    """Thumbnails of `pages`, keyed by (source_uri, page_number); each source read once."""
    from pipeline.sources import read_bytes

    by_source: dict[str, list[int]] = defaultdict(list)
    for page in pages:
        by_source[page["source_uri"]].append(int(page["page_number"]))
    out: dict[tuple[str, int], Thumbnail] = {}
    for uri, numbers in by_source.items():
        try:
            data = read_bytes(uri, dict(storage_options or {}))
        except Exception as exc:  # noqa: BLE001 - a vanished or unreadable source: say so on the card
            for number in numbers:
                out[(uri, number)] = Thumbnail(note=f"source not readable: {type(exc).__name__}: {exc}")
            continue
        for number in numbers:
            out[(uri, number)] = render_thumbnail(data, media_types.get(uri, ""), number, max_px)
    return out


def render_thumbnail(data: bytes, media_type: str, page_number: int, max_px: int = THUMB_PX) -> Thumbnail:
    """Page `page_number` (1-based) of a PDF or image file as a small JPEG."""
    try:
        if media_type == "application/pdf" or data[:5] == b"%PDF-":
            image = _render_pdf_page(data, page_number, max_px)
        else:
            image = _render_image_frame(data, page_number, max_px)
    except Exception as exc:  # noqa: BLE001 - damaged input is what error pages are about
        return Thumbnail(note=f"could not render: {type(exc).__name__}: {str(exc)[:200]}")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Thumbnail(data=buf.getvalue(), width=image.width, height=image.height)


def _render_pdf_page(data: bytes, page_number: int, max_px: int) -> Any:
    import pymupdf
    from PIL import Image

    from pipeline.logs import mupdf_to_log, quiet_mupdf

    quiet_mupdf()  # a damaged PDF's MuPDF errors go to the log, not the console
    try:
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            page = doc[page_number - 1]
            rect = page.rect  # after /Rotate
            zoom = max_px / max(rect.width, rect.height, 1.0)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    finally:
        mupdf_to_log(log, f"page {page_number}")


def _render_image_frame(data: bytes, page_number: int, max_px: int) -> Any:
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF complaints: the row records what mattered
        with Image.open(io.BytesIO(data)) as image:
            image.seek(page_number - 1)
            image.draft("RGB", (max_px, max_px))  # JPEG: decode at a fraction of the size
            frame = ImageOps.exif_transpose(image.copy()) if page_number == 1 else image.copy()
            frame = frame.convert("RGB")
            frame.thumbnail((max_px, max_px))
            return frame


# ---------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------


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


# ---- plots (matplotlib, Agg canvas, no global pyplot state) -----------------------------


def _figure(width: float = 4.6, height: float = 2.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_counts(counts: Mapping[str, int], title: str, color: str = "#4c72b0") -> bytes | None:
    """A horizontal bar per key (largest on top); None when there is nothing to count."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: kv[1])
    fig, ax = _figure(height=max(1.6, 0.35 * len(items) + 0.9))
    ax.barh([k for k, _ in items], [v for _, v in items], color=color)
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    ax.tick_params(labelsize=8)
    return _png(fig)


def plot_tokens(pages: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Histogram of generated tokens per page (pages the model answered)."""
    values = [int(p["generated_tokens"]) for p in pages if p.get("generated_tokens") is not None]
    if not values:
        return None
    fig, ax = _figure()
    ax.hist(values, bins=min(30, max(5, len(set(values)))), color="#55a868")
    ax.set_title("generated tokens per page", fontsize=10)
    ax.set_xlabel("tokens", fontsize=8)
    ax.set_ylabel("pages", fontsize=8)
    ax.tick_params(labelsize=8)
    return _png(fig)


def shard_progress(
    documents: Sequence[Mapping[str, Any]], started_at: datetime | None
) -> list[tuple[float, int, str, int]]:
    """(seconds since the run started, pages committed so far, shard, its pages) per shard.

    A documents row's `processed_at` is stamped when its shard is finished, so a shard is
    one step: the time of its commit and the pages it brought.
    """
    commits: dict[str, datetime] = {}
    pages: Counter[str] = Counter()
    for row in documents:
        stamp = row.get("processed_at")
        if not isinstance(stamp, datetime):
            continue
        shard = str(row.get("shard_id"))
        commits[shard] = max(commits.get(shard, stamp), stamp)
        pages[shard] += int(row.get("page_count") or 0)
    if not commits:
        return []
    origin = started_at or min(commits.values())
    out, total = [], 0
    for shard, stamp in sorted(commits.items(), key=lambda kv: kv[1]):
        total += pages[shard]
        out.append((max((stamp - origin).total_seconds(), 0.0), total, shard, pages[shard]))
    return out


def plot_throughput(steps: Sequence[tuple[float, int, str, int]], seconds: float | None = None) -> bytes | None:
    """Pages committed over the run, one step per shard commit; the dashed line is the
    run's average rate, so a shard far off it stands out."""
    if not steps:
        return None
    fig, ax = _figure(width=6.0, height=2.8)
    xs = [0.0, *(s[0] for s in steps)]
    ys = [0, *(s[1] for s in steps)]
    ax.step(xs, ys, where="post", color="#4c72b0")
    ax.plot(xs[1:], ys[1:], "o", color="#4c72b0", markersize=4)
    end = seconds if seconds else xs[-1]
    if end > 0:
        ax.plot([0, end], [0, ys[-1]], "--", color="#999999", linewidth=1,
                label=f"run average {ys[-1] / end:.2f} pages/s")
        ax.legend(fontsize=7, loc="upper left")
    if len(steps) <= 12:
        for x, y, shard, n in steps:
            ax.annotate(f"{shard[:8]} (+{n})", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_title(f"pages committed over the run ({len(steps)} shard{'s' if len(steps) != 1 else ''})", fontsize=10)
    ax.set_xlabel("seconds since the run started", fontsize=8)
    ax.set_ylabel("pages", fontsize=8)
    ax.tick_params(labelsize=8)
    return _png(fig)


# ---- HTML -------------------------------------------------------------------------------

_USERINFO = re.compile(r"://[^/@]*@")  # credentials in a URL are never shown
_CONTROL = {c: "\ufffd" for c in [*range(0, 9), 11, 12, *range(14, 32), 127]}


def clean_text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """Text for display: control characters made visible, long text cut with a note."""
    if value is None:
        return None
    text = str(value).translate(_CONTROL)
    if len(text) > limit:
        text = text[:limit] + f"\u2026 [{len(text) - limit} more characters]"
    return text


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def page_flags(page: Mapping[str, Any]) -> list[str]:
    """The row's notable flags as short labels (only those set)."""
    flags = []
    for name in FLAG_COLUMNS:
        value = page.get(name)
        if value is True:
            flags.append(name)
        elif isinstance(value, str) and value:
            flags.append(f"{name}: {value}")
    if page.get("render_note"):
        flags.append(f"render: {page['render_note']}")
    return flags


def gallery_cards(
    pages: Iterable[Mapping[str, Any]], thumbnails: Mapping[tuple[str, int], Thumbnail]
) -> list[dict[str, Any]]:
    """What each gallery card shows (pure)."""
    cards = []
    for p in pages:
        thumb = thumbnails.get((p["source_uri"], int(p["page_number"])), Thumbnail(note="not rendered"))
        answers = [(clean_text(a.get("question"), 300), clean_text(a.get("answer"), 600))
                   for a in (p.get("chart_answers") or [])]
        cards.append({
            "source": p["source_uri"],
            "name": str(p["source_uri"]).rsplit("/", 1)[-1],
            "page": p["page_number"],
            "status": p.get("status"),
            "error": is_error_page(p),
            "error_text": " / ".join(str(x) for x in (p.get("error_stage"), p.get("error_type"),
                                                        clean_text(p.get("error_message"), 500)) if x),
            "kind": p.get("page_kind"),
            "size": f"{p.get('width_px')}x{p.get('height_px')}" if p.get("width_px") else None,
            "tiles": p.get("tile_count"),
            "thumb": data_uri(thumb.data, "image/jpeg") if thumb.data else None,
            "thumb_w": thumb.width,
            "thumb_h": thumb.height,
            "thumb_note": thumb.note,
            "fields": [(label, clean_text(p.get(col))) for label, col in (
                ("text layer", "text_layer"), ("OCR text", "ocr_text"), ("description", "description"),
                ("chart check", "chart_check_answer"))],
            "answers": answers,
            "flags": page_flags(p),
            "tokens": p.get("generated_tokens"),
        })
    return cards


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{% if scope == "output" %}docpipe output {{ output }}{% else %}docpipe run {{ run.run_id }}{% endif %}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:4px 0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dde5;padding-bottom:4px}
.muted{color:#667085}.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.tile{background:#fff;border:1px solid #e1e5ec;border-radius:6px;padding:10px 14px;min-width:120px}
.tile b{display:block;font-size:22px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e1e5ec;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:#f1f3f7}.num{text-align:right}
.plots img{background:#fff;border:1px solid #e1e5ec;border-radius:6px}
.card{display:grid;grid-template-columns:{{ thumb_px + 20 }}px 1fr;gap:14px;background:#fff;border:1px solid #e1e5ec;border-radius:6px;padding:12px;margin:12px 0}
.card.err{border-left:5px solid #c8372d}.card img{max-width:100%;border:1px solid #d0d5dd}
.card h3{margin:0 0 6px;font-size:14px;word-break:break-all}
.fields{display:grid;grid-template-columns:1fr 1fr;gap:8px}
.field{min-width:0}.field h4{margin:0;font-size:12px;color:#475467;text-transform:uppercase;letter-spacing:.03em}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;max-height:220px;overflow:auto;background:#f6f7f9;padding:6px;border-radius:4px;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace}
.flag{display:inline-block;background:#fff4db;border:1px solid #f0c36d;border-radius:10px;padding:0 8px;margin:2px 4px 2px 0;font-size:12px}
.flag.bad{background:#fde8e7;border-color:#e8a39d}.none{color:#98a2b3;font-style:italic}
details summary{cursor:pointer}
</style></head><body>
{% if scope == "output" %}<h1>docpipe output <code>{{ output }}</code></h1>
<p class="muted">the latest row of every document and page over {{ runs_total }} run{{ "s" if runs_total != 1 else "" }}
 &middot; latest run <code>{{ run.run_id }}</code> ({{ run.status }}, started {{ run.started_at }}) &middot; source <code>{{ run.source }}</code></p>
{% else %}<h1>docpipe run <code>{{ run.run_id }}</code></h1>
<p class="muted">{{ run.status }} &middot; started {{ run.started_at }}{% if run.ended_at %} &middot; ended {{ run.ended_at }}{% endif %}
 &middot; source <code>{{ run.source }}</code> &middot; output <code>{{ output }}</code></p>{% endif %}
{% if run.message %}<p class="flag bad">{{ run.message }}</p>{% endif %}

<h2>Summary</h2>
<div class="grid">
<div class="tile"><b>{{ documents_total }}</b>documents</div>
<div class="tile"><b>{{ pages_total }}</b>pages</div>
<div class="tile"><b>{{ errors_total }}</b>errors</div>
{% if scope == "output" %}<div class="tile"><b>{{ runs_total }}</b>runs</div>
{% else %}<div class="tile"><b>{{ pages_per_s }}</b>pages/s</div>
<div class="tile"><b>{{ seconds }}</b>seconds</div>{% endif %}
<div class="tile"><b>{{ summary.generated_tokens }}</b>generated tokens</div>
</div>
<div class="grid" style="margin-top:12px">
<table><tr><th>documents by status</th><th class="num">count</th></tr>
{% for k, v in summary.documents_by_status.items() %}<tr><td>{{ k }}</td><td class="num">{{ v }}</td></tr>{% else %}<tr><td colspan="2" class="none">none</td></tr>{% endfor %}</table>
<table><tr><th>pages by status</th><th class="num">count</th></tr>
{% for k, v in summary.pages_by_status.items() %}<tr><td>{{ k }}</td><td class="num">{{ v }}</td></tr>{% else %}<tr><td colspan="2" class="none">none</td></tr>{% endfor %}</table>
<table><tr><th colspan="2">model and versions</th></tr>
<tr><td>model</td><td>{{ run.model_id or "none (model columns null)" }}</td></tr>
<tr><td>revision</td><td>{{ run.model_revision or "-" }}</td></tr>
<tr><td>dtype</td><td>{{ dtype or "-" }}</td></tr>
<tr><td>docpipe / transformers / torch</td><td>{{ run.docpipe_version }} / {{ run.transformers_version }} / {{ run.torch_version }}</td></tr>
<tr><td>settings fingerprint</td><td><code>{{ run.config_fingerprint }}</code></td></tr>
<tr><td>host</td><td>{{ run.host }}</td></tr></table>
</div>
<details style="margin-top:10px"><summary>settings of {{ "the latest run" if scope == "output" else "this run" }}</summary>
<table>{% for k, v in settings %}<tr><td>{{ k }}</td><td><code>{{ v }}</code></td></tr>{% endfor %}</table></details>

<h2>Errors</h2>
{% if summary.errors %}<table><tr><th>level</th><th>stage</th><th>type</th><th class="num">count</th><th>examples</th></tr>
{% for e in summary.errors %}<tr><td>{{ e.level }}</td><td>{{ e.stage }}</td><td><b>{{ e.type }}</b></td><td class="num">{{ e.count }}</td>
<td>{% for where, msg in e.examples %}<div><code>{{ where }}</code>: {{ msg }}</div>{% endfor %}</td></tr>{% endfor %}</table>
{% else %}<p class="none">No errors {{ "in this output" if scope == "output" else "in this run" }}.</p>{% endif %}

{% if scope == "output" %}<h2>Runs</h2>
<table><tr><th>run</th><th>status</th><th>started (UTC)</th><th class="num">seconds</th><th class="num">documents processed / discovered</th><th class="num">pages</th><th class="num">pages failed</th><th>model</th><th>message</th></tr>
{% for r in runs %}<tr><td><code>{{ r.run_id }}</code></td><td>{{ r.status }}</td><td>{{ r.started_at }}</td><td class="num">{{ r.seconds }}</td><td class="num">{{ r.documents if r.documents is not none else "-" }} / {{ r.discovered if r.discovered is not none else "-" }}</td><td class="num">{{ r.pages if r.pages is not none else "-" }}</td><td class="num">{{ r.pages_failed if r.pages_failed is not none else "-" }}</td><td>{{ r.model }}</td><td>{{ r.message }}</td></tr>{% endfor %}</table>
{% if runs_total > runs|length %}<p class="muted">the latest {{ runs|length }} of {{ runs_total }} runs</p>{% endif %}
{% endif %}
<h2>Plots</h2>
<div class="grid plots">{% for title, uri in plots %}<img src="{{ uri }}" alt="{{ title }}" title="{{ title }}">{% else %}<p class="none">Nothing to plot.</p>{% endfor %}</div>

<h2 id="gallery">Page gallery</h2>
<p class="muted">{{ cards|length }} of {{ pages_total }} pages: every error page first{% if errors_left_out %} (except {{ errors_left_out }} left out to keep this file small){% endif %}, then a fixed sample of up to {{ sample }} others, each in source order.</p>
{% for c in cards %}<div class="card{% if c.error %} err{% endif %}">
<div>{% if c.thumb %}<img src="{{ c.thumb }}" width="{{ c.thumb_w }}" height="{{ c.thumb_h }}" alt="page {{ c.page }} of {{ c.name }}">{% else %}<p class="none">{{ c.thumb_note }}</p>{% endif %}</div>
<div><h3>{{ c.name }} &middot; page {{ c.page }}</h3>
<div class="muted">{{ c.status }}{% if c.kind %} &middot; {{ c.kind }}{% endif %}{% if c.size %} &middot; {{ c.size }} px{% endif %}{% if c.tiles %} &middot; {{ c.tiles }} tiles{% endif %}{% if c.tokens is not none %} &middot; {{ c.tokens }} generated tokens{% endif %}</div>
<div>{% if c.error_text %}<span class="flag bad">{{ c.error_text }}</span>{% endif %}{% for f in c.flags %}<span class="flag">{{ f }}</span>{% endfor %}</div>
<div class="fields">{% for label, text in c.fields %}<div class="field"><h4>{{ label }}</h4>{% if text %}<pre>{{ text }}</pre>{% else %}<div class="none">none</div>{% endif %}</div>{% endfor %}
<div class="field"><h4>chart answers</h4>{% if c.answers %}{% for q, a in c.answers %}<div><b>{{ q }}</b><pre>{{ a if a else "(no answer)" }}</pre></div>{% endfor %}{% else %}<div class="none">none</div>{% endif %}</div>
</div></div></div>
{% else %}<p class="none">No pages {{ "in this output" if scope == "output" else "in this run" }}.</p>{% endfor %}
<p class="muted">Made by <code>docpipe report</code> from the committed rows of <code>{{ output }}</code>.</p>
</body></html>
"""


def build_html(
    data: RunData,
    summary: RunSummaryView,
    plots: Sequence[tuple[str, bytes]],
    cards: Sequence[Mapping[str, Any]],
    *,
    sample: int = DEFAULT_SAMPLE,
    errors_left_out: int = 0,
    thumb_px: int = THUMB_PX,
) -> str:
    """The page (pure: everything it shows is passed in)."""
    from jinja2 import Environment

    env = Environment(autoescape=True, trim_blocks=False)
    dtypes = sorted({str(p["model_dtype"]) for p in data.pages if p.get("model_dtype")})
    return env.from_string(_TEMPLATE).render(
        run=data.run,
        output=_USERINFO.sub("://", data.output),
        summary=summary,
        settings=sorted((k, json.dumps(v)) for k, v in summary.settings.items()),
        documents_total=len(data.documents),
        pages_total=len(data.pages),
        errors_total=sum(e["count"] for e in summary.errors),
        pages_per_s=f"{summary.pages_per_s:.2f}" if summary.pages_per_s is not None else "-",
        seconds=f"{summary.seconds:.1f}" if summary.seconds is not None else "-",
        dtype=", ".join(dtypes),
        scope=data.scope,
        runs=runs_table(data.runs) if data.scope == "output" else [],
        runs_total=len(data.runs),
        plots=[(title, data_uri(png, "image/png")) for title, png in plots],
        cards=cards,
        sample=sample,
        errors_left_out=errors_left_out,
        thumb_px=thumb_px,
    )


def runs_table(runs: Sequence[Mapping[str, Any]], limit: int = 50) -> list[dict[str, Any]]:
    """The runs table's rows as shown, newest first (pure)."""
    rows = []
    for run in list(runs)[::-1][:limit]:
        seconds = _seconds(run)
        rows.append({
            "run_id": run.get("run_id"), "status": run.get("status"),
            "started_at": str(run.get("started_at") or "")[:19],
            "seconds": f"{seconds:.1f}" if seconds is not None else "-",
            "documents": run.get("documents_processed"), "discovered": run.get("documents_discovered"),
            "pages": run.get("pages"), "pages_failed": run.get("pages_failed"),
            "model": run.get("model_id") or "-", "message": run.get("message") or "",
        })
    return rows


def make_plots(data: RunData, summary: RunSummaryView) -> list[tuple[str, bytes]]:
    """The plots that have something to show, titled."""
    error_counts: Counter[str] = Counter()
    for e in summary.errors:
        error_counts[f"{e['type']} ({e['level']})"] += e["count"]
    started = data.run.get("started_at") if isinstance(data.run.get("started_at"), datetime) else None
    candidates = [
        ("pages by page kind", plot_counts(summary.pages_by_kind, "pages by page kind")),
        ("errors by type", plot_counts(dict(error_counts), "errors by type", color="#c44e52")),
        ("generated tokens per page", plot_tokens(data.pages)),
    ]
    if data.scope == "run":
        candidates.append(("pages committed per shard over the run",
                           plot_throughput(shard_progress(data.documents, started), _seconds(data.run))))
    else:
        by_run = Counter(str(p.get("run_id"))[:24] for p in data.pages)
        candidates.append(("current pages by the run that wrote them",
                           plot_counts(dict(by_run.most_common(20)), "current pages by run (top 20)",
                                       color="#8172b2")))
    return [(title, png) for title, png in candidates if png is not None]


# ---------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportResult:
    run_id: str  # the run shown, or the latest run for the whole output
    html: str
    gallery_pages: int
    pages: int
    scope: str = "run"
    runs: int = 1


def make_report(
    output: str,
    run_id: str | None = None,
    *,
    sample: int = DEFAULT_SAMPLE,
    storage_options: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Read the run, render its sampled pages and plots, and assemble the page."""
    data = load_run(output, run_id, storage_options)
    summary = summarize_run(data)
    chosen, left_out = select_gallery(data.pages, sample)
    chosen = load_full_pages(output, chosen, storage_options)  # the wide columns, for the shown pages only
    media = {str(d["source_uri"]): str(d.get("media_type") or "") for d in data.documents}
    thumbs = render_thumbnails(chosen, media, storage_options)
    html = build_html(data, summary, make_plots(data, summary), gallery_cards(chosen, thumbs),
                      sample=sample, errors_left_out=left_out)
    return ReportResult(run_id=str(data.run["run_id"]), html=html, gallery_pages=len(chosen), pages=len(data.pages),
                        scope=data.scope, runs=len(data.runs))


def write_report(
    output: str,
    destination: str,
    run_id: str | None = None,
    *,
    sample: int = DEFAULT_SAMPLE,
    storage_options: Mapping[str, Any] | None = None,
) -> ReportResult:
    """`make_report`, written to `destination` (a local path or any fsspec URL)."""
    import fsspec

    result = make_report(output, run_id, sample=sample, storage_options=storage_options)
    remote = "://" in destination and not destination.startswith("file://")
    with fsspec.open(destination, "w", encoding="utf-8", **(dict(storage_options or {}) if remote else {})) as fh:
        fh.write(result.html)
    return result


def report_path(output: str, run_id: str) -> str:
    """Where a flow run leaves its report: beside the output's metadata."""
    from pipeline.dataset import META

    return f"{output.rstrip('/')}/{META}/reports/{run_id}.html"


def publish_markdown(
    output: str, run_id: str, storage_options: Mapping[str, Any] | None = None, *, shown_output: str | None = None
) -> str:
    """Write the run's report into the output and return a markdown note for Prefect saying
    where it is; a report that cannot be made is a line of the note, never a failed run."""
    destination = report_path(output, run_id)
    shown = shown_output or output  # what the note may show (no credentials in the URL)
    shown_dest = report_path(shown, run_id)
    try:
        result = write_report(output, destination, run_id, storage_options=storage_options)
    except Exception as exc:  # noqa: BLE001 - the run's rows are committed; the report is extra
        log.warning("could not write the report of run %s (%s)", run_id, exc)
        return (f"The report of run `{run_id}` could not be written ({type(exc).__name__}). Make it with\n\n"
                f"```\ndocpipe report {shown} --run {run_id} --html report.html\n```\n")
    return (f"## docpipe run `{run_id}`: report\n\nA self-contained HTML page (summary, plots, a gallery of "
            f"{result.gallery_pages} of {result.pages} pages beside their extracted text) is at\n\n"
            f"`{shown_dest}`\n\nOpen it in a browser (download it first from a bucket), or make another with "
            f"`docpipe report {shown} --run {run_id} --html report.html`.\n")


__all__ = [
    "ReportError",
    "ReportResult",
    "RunData",
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
