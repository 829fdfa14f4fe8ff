"""Exactly-once under faults, measured: each scenario run several times on a few hundred pages.

    .venv/bin/python bench/faults.py [--docs 150] [--repeat 3] [--only NAME ...]

Every scenario drives `docpipe run` as a user would (subprocesses, real signals, real PDFs),
then reads the output back and counts, per scenario over its runs: pages expected, pages
found, duplicate (doc_id, page) rows, lost pages, documents rows that are not exactly one
per file, stray files under the output, and processes left behind. Prints one table row per
scenario. Not a test: the assertions live in tests/test_faults.py, tests/test_prepare.py,
tests/test_resume.py and tests/test_retries.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.prefect_support import make_corpus, read_rows, stray_files  # noqa: E402
from tests.prep_faults import children_of, wait_gone  # noqa: E402

DOCPIPE = str(Path(sys.executable).parent / "docpipe")


@dataclass
class Tally:
    runs: int = 0
    pages_expected: int = 0
    pages_found: int = 0
    duplicates: int = 0
    lost: int = 0
    bad_document_rows: int = 0
    stray_files: int = 0
    orphans: int = 0
    notes: list[str] = field(default_factory=list)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    found, frontier = [], [pid]
    while frontier:
        kids = children_of(frontier.pop())
        found += kids
        frontier += kids
    return found


def run_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [DOCPIPE, "run", str(src), "--output", str(out), "--no-progress", *extra]


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=1800, stdin=subprocess.DEVNULL)


def committed(out: Path) -> int:
    return len(list((out / "documents").glob("part-*.parquet"))) if (out / "documents").exists() else 0


def wait_for(predicate: Callable[[], bool], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


def check(out: Path, expected: dict[str, int], tally: Tally) -> None:
    pages = read_rows(str(out), "pages")
    docs = read_rows(str(out), "documents")
    counts = collections.Counter((p["source_uri"].rsplit("/", 1)[-1], p["page_number"]) for p in pages)
    wanted = {(name, n) for name, total in expected.items() for n in range(1, total + 1)}
    tally.runs += 1
    tally.pages_expected += len(wanted)
    tally.pages_found += len(pages)
    tally.duplicates += sum(c - 1 for c in counts.values() if c > 1)
    tally.lost += len(wanted - set(counts))
    per_doc = collections.Counter(d["source_uri"].rsplit("/", 1)[-1] for d in docs)
    tally.bad_document_rows += sum(abs(per_doc.get(name, 0) - 1) for name in expected)
    tally.stray_files += len(stray_files(out))


# ---- scenarios -------------------------------------------------------------------------------


def kill_and_rerun(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """SIGKILL `docpipe run` three times at random moments, then run it to the end."""
    for _ in range(3):
        target = committed(out) + rng.randint(1, 6)
        proc = start(run_args(src, out, "--shard-size", "4"))
        wait_for(lambda: committed(out) >= target or proc.poll() is not None)
        time.sleep(rng.uniform(0, 0.2))
        below = descendants(proc.pid)
        proc.kill()
        proc.wait()
        tally.orphans += len(wait_gone(below, 5.0))
    result = finish(run_args(src, out, "--shard-size", "4"))
    if result.returncode:
        tally.notes.append(f"final run exit {result.returncode}")


def kill_workers(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """SIGKILL prep workers mid-document while the run goes on (the OOM killer, a renderer crash)."""
    proc = start(run_args(src, out, "--shard-size", "16", "--prep-workers", "2"))
    kills = 0
    while proc.poll() is None and kills < 6:
        time.sleep(rng.uniform(1.0, 3.0))
        workers = [p for p in descendants(proc.pid) if "spawn_main" in _cmdline(p)]
        if workers and proc.poll() is None:
            os.kill(rng.choice(workers), signal.SIGKILL)
            kills += 1
    code = proc.wait(timeout=1800)
    if code:
        tally.notes.append(f"run exit {code}: {proc.stderr.read().decode()[-200:] if proc.stderr else ''}")
    tally.notes.append(f"{kills} worker kills")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def concurrent_other_shard_size(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """Two deployments of one job with other shard sizes start 1.5 s apart on one output."""
    first = start(run_args(src, out, "--shard-size", "8"))
    time.sleep(1.5)
    second = finish(run_args(src, out, "--shard-size", "5", "--wait-for-output-s", "1800"))
    first.wait(timeout=1800)
    busy = finish(run_args(src, out, "--shard-size", "5"))  # nothing running now: a plain rerun
    if (first.returncode, second.returncode, busy.returncode) != (0, 0, 0):
        tally.notes.append(f"exits {first.returncode}/{second.returncode}/{busy.returncode}")


def concurrent_refused(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """A second run while the first holds the output exits 3 at once; the first finishes."""
    first = start(run_args(src, out, "--shard-size", "8"))
    wait_for(lambda: (out / "_docpipe" / "lease").exists())
    second = finish(run_args(src, out, "--shard-size", "5"))
    first.wait(timeout=1800)
    if second.returncode != 3:
        tally.notes.append(f"second run exit {second.returncode} (expected 3)")


def ctrl_c_and_rerun(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """Ctrl-C (SIGINT to the process group) mid-run, then the same command again."""
    target = rng.randint(2, 10)
    proc = start(run_args(src, out, "--shard-size", "4"))
    wait_for(lambda: committed(out) >= target or proc.poll() is not None)
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    tally.orphans += len(wait_gone(below, 5.0))
    if proc.returncode != 130:
        tally.notes.append(f"interrupted run exit {proc.returncode}")
    result = finish(run_args(src, out, "--shard-size", "4"))
    if result.returncode:
        tally.notes.append(f"rerun exit {result.returncode}")


def rerun_other_settings(src: Path, out: Path, rng: random.Random, tally: Tally) -> None:
    """A finished output, rerun with other output settings: refused with exit 2, output untouched."""
    finish(run_args(src, out))
    result = finish(run_args(src, out, "--max-dpi", "150"))
    if result.returncode != 2:
        tally.notes.append(f"changed settings exit {result.returncode} (expected 2)")


SCENARIOS: dict[str, Callable[[Path, Path, random.Random, Tally], None]] = {
    "kill -9 run x3, rerun": kill_and_rerun,
    "prep workers killed mid-document": kill_workers,
    "2 runs, other shard sizes (wait)": concurrent_other_shard_size,
    "2 runs at once (refused)": concurrent_refused,
    "Ctrl-C, rerun": ctrl_c_and_rerun,
    "rerun with other settings": rerun_other_settings,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=150, help="PDFs per corpus (1-3 pages each, ~2 pages on average)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (substring match)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    chosen = {k: v for k, v in SCENARIOS.items() if not args.only or any(o in k for o in args.only)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-faults-") as tmp:
        src = Path(tmp) / "in"
        expected = make_corpus(src, args.docs)
        for name, scenario in chosen.items():
            tally = Tally()
            t0 = time.monotonic()
            for i in range(args.repeat):
                out = Path(tmp) / f"out-{len(rows)}-{i}"
                scenario(src, out, rng, tally)
                check(out, expected, tally)
            rows.append((name, tally, time.monotonic() - t0))
            print(f"... {name}: {tally}", file=sys.stderr, flush=True)
    print(f"seed {seed}; {args.docs} PDFs, {sum(expected.values())} pages per corpus")
    header = ("scenario", "runs", "pages expected", "pages found", "duplicates", "lost", "doc rows off",
              "stray files", "orphan procs", "seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, t, seconds in rows:
        cells = (name, t.runs, t.pages_expected, t.pages_found, t.duplicates, t.lost, t.bad_document_rows,
                 t.stray_files, t.orphans, f"{seconds:.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    notes = [(name, t.notes) for name, t, _ in rows if t.notes]
    for name, items in notes:
        print(f"note: {name}: {'; '.join(items)}")


if __name__ == "__main__":
    main()
