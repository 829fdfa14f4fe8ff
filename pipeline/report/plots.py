"""The report's plots: matplotlib on an Agg canvas, no global pyplot state; PNG bytes out."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pipeline.report.data import RunData, RunSummaryView, _seconds


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
