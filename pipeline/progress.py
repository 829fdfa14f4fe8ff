"""Terminal progress and the end-of-run summary for local runs (rich)."""

from __future__ import annotations

import shlex
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import RunConfig
from pipeline.runner import RunSummary, WorkPlan, run


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"docpipe run {summary.run_id}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for row in summary.as_table_rows():
        table.add_row(str(row["metric"]), str(row["value"]))
    return table


def run_with_progress(config: RunConfig, console: Console | None = None) -> RunSummary:
    """Run locally with a progress bar on stderr and the summary on stdout."""
    err = Console(stderr=True)
    out = console or Console(file=sys.stdout)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[pages]} pages"),
        TimeElapsedColumn(),
        console=err,
        disable=not config.progress,
        transient=False,
    )
    task_id = progress.add_task("discovering", total=None, pages=0)
    pages = 0

    def on_plan(plan: WorkPlan) -> None:
        progress.update(task_id, description="documents", total=plan.to_do)
        if plan.already_done:
            err.print(f"{plan.already_done} of {plan.total_documents} documents already in {config.output}: skipped")
        if config.model is None:
            err.print("no --model given: pages are rasterized and tiled, model columns stay null")

    def on_event(event: str, count: int) -> None:
        nonlocal pages
        if event == "page":
            pages += count
            progress.update(task_id, pages=pages)
        elif event == "document":
            progress.advance(task_id, count)

    with progress:
        summary = run(config, progress=on_event, on_plan=on_plan)
    out.print(summary_table(summary))
    out.print(report_hint(config.output, summary.run_id), markup=False, highlight=False, soft_wrap=True)
    return summary


def report_hint(output: str, run_id: str) -> str:
    """The command that makes this run's visual report (pages beside what was extracted)."""
    return f"report: docpipe report {shlex.quote(output)} --run {run_id} --html report.html"
