"""Progress of a run while it works: one meter, shown on the terminal (rich) and in Prefect.

`ProgressMeter` turns the runner's progress events (see `pipeline.runner.ProgressFn`) into
the figures people watch: documents and pages done overall and in the current shard,
pages/s, generated tokens/s, the model's busy share and an ETA. It is plain state plus
arithmetic (no terminal, no clock of its own: every method takes `now`), so the CLI's bar,
the `-v` log lines and the flows' progress artifact all say the same thing.

Pages are counted as their rows are recorded, which for model pages is when their batch
comes back; in between, the engine's cumulative counters (generated tokens, model seconds:
updated after every `generate` call) keep the figures moving while a batch is in the model.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.runner import InProcess, Run, RunSummary, WorkPlan

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.page_engine import EngineStats

log = logging.getLogger("docpipe.progress")

LOG_EVERY_S = 10.0  # `-v`: one progress line this often (and at each shard's end)


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """The figures of a run at one moment (all derived from events and the engine's counters)."""

    documents_total: int  # documents this run processes (already-done ones excluded)
    documents_done: int
    pages_prepared: int
    pages_done: int
    pages_expected: int | None  # estimate from the pages per document seen so far
    shard_index: int  # 1-based; 0 before the first shard
    shard_count: int
    shard_id: str | None
    shard_documents: int
    shard_pages_done: int
    elapsed_s: float  # since the work started (after discovery and model loading)
    pages_per_s: float
    generated_tokens: int
    tokens_per_s: float
    model_busy: float | None  # share of wall time in the model since it loaded (None: no model)
    eta_s: float | None
    model_loading: bool

    @property
    def percent(self) -> float:
        """Share done, for a progress artifact: by pages when they can be estimated, else documents."""
        if self.documents_total == 0:
            return 100.0
        if self.pages_expected:
            share = min(self.pages_done / self.pages_expected, 1.0)
            share = max(share, self.documents_done / self.documents_total)
        else:
            share = self.documents_done / self.documents_total
        return round(100.0 * min(share, 1.0), 2)

    def describe(self) -> str:
        """One line: `shard 2/5 (a1b2c3) 40/64 pages | 120/320 pages, 3.1 pages/s, 410 tok/s, model 87% busy, ETA 1m20s`."""
        if self.model_loading:
            return "loading model ..."
        parts = []
        if self.shard_index:
            sid = f" ({self.shard_id[:8]})" if self.shard_id else ""
            parts.append(f"shard {self.shard_index}/{self.shard_count}{sid}: {self.shard_pages_done} pages")
        expected = f"/~{self.pages_expected}" if self.pages_expected and self.pages_done < self.pages_expected else ""
        overall = f"{self.pages_done}{expected} pages"
        if self.pages_prepared > self.pages_done:
            overall += f" ({self.pages_prepared - self.pages_done} in the model)" if self.model_busy is not None else ""
        overall = "overall " + overall
        overall += f", {self.pages_per_s:.2f} pages/s"
        if self.model_busy is not None:
            overall += f", {self.tokens_per_s:.0f} tok/s, model {self.model_busy:.0%} busy"
        if self.eta_s is not None:
            overall += f", ETA {format_seconds(self.eta_s)}"
        parts.append(overall)
        return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressMeter:
    """Counts a run's progress events; `snapshot(now)` gives the figures.

    Shards are processed in the plan's order (`runner.run` and the flows do), so the n-th
    "shard" event is the plan's n-th shard. `attach(stats)` lets the figures follow the
    engine's cumulative counters (`EngineStats`: generated_tokens, model_s) between batches.
    """

    def __init__(self, *, now: float | None = None) -> None:
        self.t_start = time.perf_counter() if now is None else now
        self.t_work: float | None = None  # first shard started
        self.t_model: float | None = None  # model loaded
        self.documents_total = 0
        self.shard_ids: list[str] = []
        self.shard_sizes: list[int] = []
        self.documents_done = 0
        self.documents_prepared = 0
        self.pages_prepared = 0
        self.pages_done = 0
        self.shard_index = 0
        self.shard_documents = 0
        self.shard_pages_done = 0
        self.tokens = 0
        self.model_ms = 0
        self.model_loading = False
        self.in_model_since: float | None = None  # a batch is in the model since then
        self.model_load_s: float | None = None
        self._stats: EngineStats | None = None
        self._stats_base: tuple[int, float] = (0, 0.0)
        self._tokens_at_attach = 0
        self._model_ms_at_attach = 0

    # ---- inputs --------------------------------------------------------------------
    def on_plan(self, plan: WorkPlan) -> None:
        self.documents_total = plan.to_do
        self.shard_ids = [s.shard_id for s in plan.shards]
        self.shard_sizes = [len(s.refs) for s in plan.shards]

    def set_total(self, documents: int, shard_ids: list[str]) -> None:
        self.documents_total = documents
        self.shard_ids = list(shard_ids)

    @property
    def attached(self) -> bool:
        return self._stats is not None

    def attach(self, stats: EngineStats) -> None:
        """Follow an engine's cumulative counters (`.generated_tokens`, `.model_s`) from now on."""
        self._stats = stats
        self._stats_base = (int(stats.generated_tokens), float(stats.model_s))
        self._tokens_at_attach, self._model_ms_at_attach = self.tokens, self.model_ms

    def on_event(self, event: str, count: int, *, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if event == "model_loading":
            self.model_loading = True
        elif event == "model_loaded":
            self.model_loading = False
            self.model_load_s = count / 1000.0
            self.t_model = now
        elif event == "shard":
            if self.t_work is None:
                self.t_work = now
            self.shard_index += 1
            self.shard_documents = count
            self.shard_pages_done = 0
        elif event == "prepared":
            self.pages_prepared += count
        elif event == "prepared_document":
            self.documents_prepared += count
        elif event == "page":
            self.pages_done += count
            self.shard_pages_done += count
        elif event == "document":
            self.documents_done += count
        elif event == "tokens":
            self.tokens += count
        elif event == "model_start":
            self.in_model_since = now
        elif event == "model_ms":
            self.model_ms += count
            self.in_model_since = None

    # ---- outputs -------------------------------------------------------------------
    def _live_model(self, now: float) -> tuple[int, float]:
        """(generated tokens, model seconds) so far: finished batches, the batch in the model
        until now, and the engine's counters when attached (they move with every `generate`)."""
        tokens, model_s = self.tokens, self.model_ms / 1000.0
        if self.in_model_since is not None:
            model_s += max(now - self.in_model_since, 0.0)
        if self._stats is not None:
            live_tokens = self._tokens_at_attach + int(self._stats.generated_tokens) - self._stats_base[0]
            live_s = self._model_ms_at_attach / 1000.0 + float(self._stats.model_s) - self._stats_base[1]
            tokens, model_s = max(tokens, live_tokens), max(model_s, live_s)
        return tokens, model_s

    def shard_id(self) -> str | None:
        if 0 < self.shard_index <= len(self.shard_ids):
            return self.shard_ids[self.shard_index - 1]
        return None

    def snapshot(self, now: float | None = None) -> ProgressSnapshot:
        now = time.perf_counter() if now is None else now
        start = self.t_work if self.t_work is not None else now
        elapsed = max(now - start, 0.0)
        pages_per_s = self.pages_done / elapsed if elapsed > 0 else 0.0
        tokens, model_s = self._live_model(now)
        has_model = self.t_model is not None
        since_model = max(now - self.t_model, 1e-9) if self.t_model is not None else 0.0
        tokens_per_s = tokens / since_model if has_model else 0.0
        busy = min(model_s / since_model, 1.0) if has_model else None
        expected = None
        if self.documents_prepared and self.pages_prepared:
            per_document = self.pages_prepared / self.documents_prepared
            expected = max(round(per_document * self.documents_total), self.pages_prepared)
        eta = None
        if self.documents_total and self.documents_done >= self.documents_total:
            eta = 0.0
        elif expected and pages_per_s > 0:
            eta = max(expected - self.pages_done, 0) / pages_per_s
        elif self.documents_done and elapsed > 0:
            eta = (self.documents_total - self.documents_done) / (self.documents_done / elapsed)
        return ProgressSnapshot(
            documents_total=self.documents_total,
            documents_done=self.documents_done,
            pages_prepared=self.pages_prepared,
            pages_done=self.pages_done,
            pages_expected=expected,
            shard_index=self.shard_index,
            shard_count=len(self.shard_ids) or self.shard_index,
            shard_id=self.shard_id(),
            shard_documents=self.shard_documents,
            shard_pages_done=self.shard_pages_done,
            elapsed_s=elapsed,
            pages_per_s=pages_per_s,
            generated_tokens=tokens,
            tokens_per_s=tokens_per_s,
            model_busy=busy,
            eta_s=eta,
            model_loading=self.model_loading,
        )


# ---------------------------------------------------------------------------------------
# Model size, for the "loading model" line
# ---------------------------------------------------------------------------------------


def model_size_bytes(model: str) -> int | None:
    """Bytes of weights in a local model folder (safetensors files), None for a hub id."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def format_bytes(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size >= 10**9:
        return f"{size / 10**9:.1f} GB"
    return f"{size / 10**6:.1f} MB"


# ---------------------------------------------------------------------------------------
# The terminal
# ---------------------------------------------------------------------------------------


class _MeterProgress(Progress):
    """A rich progress bar with the meter's line under it, rendered afresh on every refresh,
    so the figures move between events (tokens/s while a batch is in the model)."""

    def __init__(self, meter: ProgressMeter, *columns: Any, **kwargs: Any) -> None:
        self.meter = meter
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        if self.meter.shard_index or self.meter.model_loading:
            yield Text(self.meter.snapshot().describe(), overflow="fold")


class _Ticker:
    """Calls `tick` every `every_s` seconds on a daemon thread until stopped (the `-v` log
    lines of a batch that keeps the model busy for minutes)."""

    def __init__(self, every_s: float, tick: Callable[[], None]) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s, tick), name="docpipe-progress", daemon=True)

    def _loop(self, every_s: float, tick: Callable[[], None]) -> None:
        while not self._stop.wait(every_s):
            tick()

    def __enter__(self) -> "_Ticker":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"docpipe run {summary.run_id}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for row in summary.as_table_rows():
        table.add_row(str(row["metric"]), str(row["value"]))
    return table


def run_with_progress(run: Run, console: Console | None = None) -> RunSummary:
    """Execute `run` in this process with live progress on stderr and the summary on stdout.

    The bar's line moves with every page row and every `generate` call (see ProgressMeter);
    with `-v` (the `docpipe.progress` logger at INFO) the same line is also logged every
    LOG_EVERY_S seconds and at each shard's end, which is what a log file of a long run keeps.
    """
    config = run.config
    err = Console(stderr=True)
    out = console or Console(file=sys.stdout)
    meter = ProgressMeter()
    progress = _MeterProgress(
        meter,
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not config.progress,
        transient=False,
        refresh_per_second=2,
    )
    task_id = progress.add_task("discovering", total=None)
    last_log = [time.perf_counter()]

    def say(message: str) -> None:
        if config.progress:
            progress.console.print(message, markup=False, highlight=False)
        else:
            log.info(message)

    def on_plan(plan: WorkPlan) -> None:
        meter.on_plan(plan)
        progress.update(task_id, description="documents", total=plan.to_do)
        if plan.already_done:
            say(f"{plan.already_done} of {plan.total_documents} documents already in {config.output}: skipped")
        if config.model is None:
            say("no --model given: pages are rasterized and tiled, model columns stay null")

    def on_event(event: str, count: int) -> None:
        meter.on_event(event, count)
        if event == "model_loading":
            assert config.model is not None
            progress.update(task_id, description="loading model")
            say(f"loading model {config.model} ({format_bytes(model_size_bytes(config.model))}) ...")
        elif event == "model_loaded":
            from pipeline import runner

            engine = runner.get_engine(config)  # the one just loaded (cached per process)
            if engine is not None:
                meter.attach(engine.stats)
            progress.update(task_id, description="documents")
            say(f"model loaded in {count / 1000:.1f} s")
        elif event == "document":
            progress.advance(task_id, count)
        shard_end = event == "document" and meter.shard_index and meter.documents_done == sum(
            meter.shard_sizes[: meter.shard_index]
        )
        if shard_end:
            log_line(force=True)

    def log_line(force: bool = False) -> None:
        now = time.perf_counter()
        if log.isEnabledFor(logging.INFO) and meter.shard_index and (force or now - last_log[0] >= LOG_EVERY_S):
            last_log[0] = now
            log.info("%s", meter.snapshot(now).describe())

    with progress, _Ticker(1.0, log_line):
        summary = run.execute(InProcess(progress=on_event, on_plan=on_plan))
    out.print(summary_table(summary))
    out.print(report_hint(config.output, summary.run_id), markup=False, highlight=False, soft_wrap=True)
    return summary


def report_hint(output: str, run_id: str) -> str:
    """The command that makes the output's visual report (pages beside what was extracted;
    after a rerun with nothing new, the run's own rows are none, so the output is shown)."""
    return (f"report: docpipe report {shlex.quote(output)} --html report.html   "
            f"(the whole output; --run {run_id} for this run's rows)")
