"""Exactly-once under crashes: SIGKILL a run mid-way several times, rerun, check every page once.

Two drivers over the same checks: `docpipe run` (no Prefect) and the `docpipe-ingest`
flow run from a plain Python process against a real Prefect server. Each run is killed
after a random number of shards (1-4) have committed plus a random short delay, three
times; then the run is repeated to completion, repeated again (nothing to do), and
repeated once more after new files arrive (only they are processed).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.prefect_support import (
    BIN,
    PrefectStack,
    expected_pages,
    make_corpus,
    page_key_counts,
    pages_by_name,
    prefect_env,
    read_rows,
    start_process,
    stray_files,
)

pytestmark = pytest.mark.slow

DOCS = 30
SHARD_SIZE = 1  # many small shards: kills land between and inside shard commits
KILLS = 3
Command = Callable[[Path, Path, str], list[str]]


def committed(out: Path) -> int:
    return len(list((out / "documents").glob("part-*.parquet"))) if (out / "documents").exists() else 0


def cli_command(src: Path, out: Path, run_id: str) -> list[str]:
    return [str(BIN / "docpipe"), "run", str(src), "--output", str(out), "--shard-size", str(SHARD_SIZE),
            "--no-progress", "--run-id", run_id]


def flow_command(src: Path, out: Path, run_id: str) -> list[str]:
    call = (f"from flows.ingest import ingest; "
            f"ingest(source={str(src)!r}, output={str(out)!r}, shard_size={SHARD_SIZE}, run_id={run_id!r})")
    return [sys.executable, "-c", call]


def kill_mid_run(command: list[str], env: dict[str, str], out: Path, rng: random.Random, log_dir: Path,
                 name: str) -> dict[str, int | float | bool]:
    """Start the run, wait for 1-4 more committed shards, wait a random moment, SIGKILL it."""
    before = committed(out)
    target = before + rng.randint(1, 4)
    proc = start_process(name, command, env, log_dir)
    deadline = time.monotonic() + 180
    try:
        while proc.alive() and committed(out) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = not proc.alive()
        delay = rng.uniform(0.0, 0.1)
        time.sleep(delay)
        if proc.alive():
            proc.kill()
        else:
            finished = True
    finally:
        proc.stop()
    assert not finished or proc.popen.returncode == 0, proc.log()[-3000:]
    pages_parts = {p.name for p in (out / "pages").glob("part-*.parquet")} if (out / "pages").exists() else set()
    docs_parts = {p.name for p in (out / "documents").glob("part-*.parquet")} if (out / "documents").exists() else set()
    return {"committed_before": before, "committed_after": len(docs_parts), "delay_s": round(delay, 3),
            "finished_before_kill": finished, "uncommitted_pages_files": len(pages_parts - docs_parts),
            "temp_files": sum(1 for p in out.rglob(".*") if p.is_file())}


def run_to_end(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_exactly_once(out: Path, expected: dict[str, int]) -> dict[str, int]:
    pages = read_rows(str(out), "pages")
    counts = page_key_counts(pages)
    docs = read_rows(str(out), "documents")
    figures = {"pages_expected": sum(expected.values()), "pages_found": len(pages),
               "duplicates": sum(c - 1 for c in counts.values() if c > 1), "documents_rows": len(docs)}
    assert figures["duplicates"] == 0, figures
    assert pages_by_name(pages) == expected_pages(expected), figures
    assert sorted(Path(d["source_uri"]).name for d in docs) == sorted(expected), figures
    assert all(d["status"] == "ok" for d in docs)
    # every pages file has its commit marker and nothing else sits under a final name
    pages_parts = {p.name for p in (out / "pages").glob("part-*.parquet")}
    docs_parts = {p.name for p in (out / "documents").glob("part-*.parquet")}
    assert pages_parts == docs_parts
    assert stray_files(out) == []
    return figures


def crash_resume_scenario(command: Command, env: dict[str, str], tmp_path: Path) -> dict[str, object]:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, DOCS)

    kills = [kill_mid_run(command(src, out, "crashy"), env, out, rng, tmp_path / "logs", f"run-{i}")
             for i in range(KILLS)]
    assert any(not k["finished_before_kill"] for k in kills), (seed, kills)
    assert committed(out) < DOCS / SHARD_SIZE, (seed, kills)  # the kills left work to do
    run_to_end(command(src, out, "final"), env)
    figures = check_exactly_once(out, expected)

    # Nothing new: nothing is rewritten.
    def data_files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for t in ("pages", "documents") for p in (out / t).glob("part-*.parquet")}

    stamps = data_files()
    run_to_end(command(src, out, "noop"), env)
    assert data_files() == stamps
    assert "noop" not in {d["run_id"] for d in read_rows(str(out), "documents")}

    # New files: only they are processed.
    expected.update(make_corpus(src, 3, start=DOCS))
    run_to_end(command(src, out, "added"), env)
    check_exactly_once(out, expected)
    by_run: dict[str, set[str]] = {}
    for d in read_rows(str(out), "documents"):
        by_run.setdefault(d["run_id"], set()).add(Path(d["source_uri"]).name)
    assert by_run["added"] == {f"doc-{i:03d}.pdf" for i in range(DOCS, DOCS + 3)}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # old shards untouched
    report = {"seed": seed, "kills": kills, **figures}
    print("kill-and-rerun:", json.dumps(report))
    return report


def test_docpipe_run_survives_repeated_sigkill(tmp_path: Path):
    env = prefect_env(tmp_path / "prefect-home")
    crash_resume_scenario(cli_command, env, tmp_path)


def test_ingest_flow_survives_repeated_sigkill(prefect_server: PrefectStack, tmp_path: Path):  # the session's server
    crash_resume_scenario(flow_command, prefect_server.env(), tmp_path)
