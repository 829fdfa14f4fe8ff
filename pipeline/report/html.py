"""The report's HTML: one self-contained page (inline CSS, plots and thumbnails as data URIs,
no script), rendered by Jinja2 from the pure parts; the gallery's cards."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.report.data import DEFAULT_SAMPLE, RunData, RunSummaryView, _seconds, is_error_page
from pipeline.report.thumbnails import THUMB_PX, Thumbnail

TEXT_LIMIT = 3000  # characters of each text field shown per page
FLAG_COLUMNS = ("truncated", "repetitive", "downscaled", "has_chart", "ocr_source")

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
