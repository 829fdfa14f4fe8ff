"""Exactly-once under faults, measured: each scenario run several times on a few hundred pages.

    .venv/bin/python bench/faults.py [--docs 150] [--repeat 3] [--only NAME ...]

Every scenario drives `docpipe run` as a user would (subprocesses, real signals, real PDFs,
a moto S3 server on 127.0.0.1 for the S3 rows), then reruns the same command until the
output is exact (at most 3 times) and reads it back, counting per scenario over its runs:
pages expected, pages found, duplicate (doc_id, page) rows, lost pages, documents rows that
are not exactly one per file (or carry an id that is not the hash of the file's bytes),
stray files under the output (quarantined files are counted apart), processes left behind,
tracebacks printed by any process, and the most plain reruns any run needed after the fault.
Stalls are placed with DOCPIPE_FAULT_POINT (the process stops itself with SIGSTOP at that
point of the commit protocol and writes a marker file this script polls), never with sleeps.
Not a test: the assertions live in tests/e2e/test_faults.py, tests/dataset/test_dataset.py,
tests/prepare/test_pool.py, tests/e2e/test_resume.py and tests/shard/test_retries.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import shutil
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
    quarantined: int = 0
    orphans: int = 0
    tracebacks: int = 0
    reruns: int = 0  # the most plain reruns one run of the scenario needed to be exact
    notes: list[str] = field(default_factory=list)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    found, frontier = [], [pid]
    while frontier:
        kids = children_of(frontier.pop())
        found += kids
        frontier += kids
    return found


def run_args(src: Path, out: Path | str, *extra: str) -> list[str]:
    return [DOCPIPE, "run", str(src), "--output", str(out), "--no-progress", *extra]


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


STDERR: list[str] = []  # what every process of the current scenario printed on stderr (for tracebacks)


def finish(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(args, capture_output=True, timeout=1800, stdin=subprocess.DEVNULL, env=env)
    STDERR.append(result.stderr.decode(errors="replace"))
    return result


def committed(out: Path) -> int:
    return len(list((out / "documents").glob("part-*.parquet"))) if (out / "documents").exists() else 0


def wait_for(predicate: Callable[[], bool], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclass
class Target:
    """Where a scenario's output is and what it must hold in the end."""

    url: str
    expected: dict[str, int]  # file name -> pages (0: a documents row, no pages)
    src: Path
    options: dict | None = None
    extra: tuple[str, ...] = ()  # arguments of the plain rerun

    @property
    def local(self) -> Path | None:
        return None if "://" in self.url else Path(self.url)


def _option_args(target: Target) -> list[str]:
    return ["--storage-options", json.dumps(target.options)] if target.options else []


def problems(target: Target) -> dict[str, int]:
    """How far the output is from exact: duplicates, lost pages, documents rows off."""
    try:
        pages = read_rows(target.url, "pages", target.options)
        docs = read_rows(target.url, "documents", target.options)
    except Exception:  # noqa: BLE001 - an output the readers cannot read is not exact
        return {"duplicates": 0, "lost": sum(target.expected.values()), "rows_off": len(target.expected),
                "found": 0, "wanted": sum(target.expected.values())}
    counts = collections.Counter((p["source_uri"].rsplit("/", 1)[-1], p["page_number"]) for p in pages)
    wanted = {(name, n) for name, total in target.expected.items() for n in range(1, total + 1)}
    per_doc = collections.Counter(d["source_uri"].rsplit("/", 1)[-1] for d in docs)
    rows_off = sum(abs(per_doc.get(name, 0) - 1) for name in target.expected)
    rows_off += sum(n for name, n in per_doc.items() if name not in target.expected)
    for d in docs:  # a row must carry the hash of the bytes the file holds now
        path = target.src / d["source_uri"].rsplit("/", 1)[-1]
        if path.exists() and d["status"] in ("ok", "partial") and d["doc_id"] != hashlib.sha256(
                path.read_bytes()).hexdigest():
            rows_off += 1
    extra_pages = sum(c for (name, _n), c in counts.items() if name not in target.expected)
    return {"duplicates": sum(c - 1 for c in counts.values() if c > 1) + extra_pages,
            "lost": len(wanted - set(counts)), "rows_off": rows_off, "found": len(pages), "wanted": len(wanted)}


def settle(target: Target, tally: Tally, max_reruns: int = 3) -> None:
    """Rerun the plain command until the output is exact (or `max_reruns` were made); tally the end state."""
    reruns = 0
    found = problems(target)
    while (found["duplicates"] or found["lost"] or found["rows_off"]) and reruns < max_reruns:
        if os.environ.get("FAULTS_DEBUG"):
            print(f"    not exact yet: {found}", file=sys.stderr)
        reruns += 1
        result = finish(run_args(target.src, target.url, *target.extra, *_option_args(target)))
        if result.returncode:
            tally.notes.append(f"rerun {reruns} exit {result.returncode}")
        found = problems(target)
    tally.runs += 1
    tally.pages_expected += found["wanted"]
    tally.pages_found += found["found"]
    tally.duplicates += found["duplicates"]
    tally.lost += found["lost"]
    tally.bad_document_rows += found["rows_off"]
    tally.reruns = max(tally.reruns, reruns)
    if target.local is not None:
        stray = stray_files(target.local)
        tally.quarantined += sum(1 for f in stray if f.startswith("_docpipe/quarantine/"))
        tally.stray_files += sum(1 for f in stray if not f.startswith("_docpipe/quarantine/"))
    tally.tracebacks += sum(err.count("Traceback") for err in STDERR)


def check(out: Path, expected: dict[str, int], tally: Tally, src: Path) -> None:
    """The first scenarios' check: the output as the scenario left it, rerun if not exact."""
    settle(Target(str(out), expected, src), tally)


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


# ---- issue 13: stalls, another PID namespace, changed sources, damaged files -----------------

TTL_S = "4"  # a short lease TTL for the stall rows (the default is 60 s)


def stall(args: list[str], point: str, marker: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `args` so that it stops itself (SIGSTOP) at `point`; return once it has."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**env, "DOCPIPE_FAULT_POINT": point, "DOCPIPE_FAULT_MARKER": str(marker)})
    wait_for(lambda: (marker.exists() and _proc_state(proc.pid) == "T") or proc.poll() is not None)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before it reached {point}")
    return proc


def wake(proc: subprocess.Popen[bytes]) -> int:
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=1800)
    STDERR.append(err.decode(errors="replace"))
    return proc.returncode


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _stall_takeover(target: Target, point: str, tally: Tally, first: tuple[str, ...], second: tuple[str, ...]) -> None:
    env = {**os.environ, "DOCPIPE_LEASE_TTL_S": TTL_S}
    marker = Path(tempfile.mkdtemp(prefix="docpipe-stall-")) / "marker"
    out = target.url
    stalled = stall(run_args(target.src, out, *first, *_option_args(target)), point, marker, env)
    taker = finish(run_args(target.src, out, *second, "--wait-for-output-s", "600", *_option_args(target)), env)
    code = wake(stalled)
    if taker.returncode or code != 1:
        tally.notes.append(f"exits taker {taker.returncode} / stalled {code}")
    target.extra = second


def stall_at_commit(target: Target, rng: random.Random, tally: Tally) -> None:
    """Run A stops right before a commit (documents file) for longer than the TTL; B takes over
    with another shard size and finishes; A wakes and goes on."""
    _stall_takeover(target, "before_commit", tally, ("--shard-size", "4"), ("--shard-size", "5"))


def stall_while_planning(target: Target, rng: random.Random, tally: Tally) -> None:
    """Run A stops while writing its plans past the TTL; B (another shard size) takes over and
    finishes; A wakes and writes its late plan; a plain rerun follows."""
    _stall_takeover(target, "before_plan", tally, ("--shard-size", "4"), ("--shard-size", "5"))
    rerun = finish(run_args(target.src, target.url, "--shard-size", "5"))  # finds the late plan
    if rerun.returncode:
        tally.notes.append(f"plain rerun exit {rerun.returncode}")


def other_pid_namespace(target: Target, rng: random.Random, tally: Tally) -> None:
    """While run A works, a run from another PID namespace (`unshare --pid --fork`, as a second
    container with the same host name) is started on the same output: it must not take over."""
    out = Path(target.url)
    first = start(run_args(target.src, out, "--shard-size", "4"))
    wait_for(lambda: committed(out) >= 2 or first.poll() is not None)
    other = finish(["unshare", "--pid", "--fork", *run_args(target.src, out, "--shard-size", "5")])
    code = first.wait(timeout=1800)
    STDERR.append(first.stderr.read().decode(errors="replace") if first.stderr else "")
    if other.returncode != 3 or code != 0:
        tally.notes.append(f"other-namespace run exit {other.returncode} (expected 3), first {code}")
    target.extra = ("--shard-size", "4")


def _mutate(target: Target, rng: random.Random, *, deleted_keep_rows: bool) -> None:
    """Rewrite 4 files (other page counts), delete 3, add 3; update what the output must hold."""
    from tests.prefect_support import make_pdf

    names = sorted(target.expected)
    picked = rng.sample(names, 7)
    for name in picked[:4]:
        pages = target.expected[name] % 3 + 1
        make_pdf(target.src / name, pages, f"{name}, rewritten {rng.random()}")
        target.expected[name] = pages
    for name in picked[4:]:
        (target.src / name).unlink()
        if not deleted_keep_rows:
            target.expected[name] = 0  # deleted after discovery, before it was read: one error row
    start_at = 10_000 + rng.randrange(1000) * 10
    target.expected.update(make_corpus(target.src, 3, start=start_at))


def files_changed_mid_run(target: Target, rng: random.Random, tally: Tally) -> None:
    """Files rewritten, deleted and added after the run listed them and before it read them."""
    marker = Path(tempfile.mkdtemp(prefix="docpipe-stall-")) / "marker"
    stalled = stall(run_args(target.src, Path(target.url), "--shard-size", "4"), "after_discover", marker,
                    dict(os.environ))
    _mutate(target, rng, deleted_keep_rows=False)
    if wake(stalled):
        tally.notes.append("mid-run changes: run exit non-zero")
    target.extra = ("--shard-size", "4")


def files_changed_after(target: Target, rng: random.Random, tally: Tally) -> None:
    """A finished output; then files are rewritten, deleted and added; then the nightly rerun."""
    finish(run_args(target.src, Path(target.url), "--shard-size", "4"))
    _mutate(target, rng, deleted_keep_rows=True)
    finish(run_args(target.src, Path(target.url), "--shard-size", "4"))
    target.extra = ("--shard-size", "4")


def _damaged(kind: str) -> Callable[[Target, random.Random, Tally], None]:
    def scenario(target: Target, rng: random.Random, tally: Tally) -> None:
        out = Path(target.url)
        finish(run_args(target.src, out, "--shard-size", "8"))
        pages = sorted((out / "pages").glob("part-*.parquet"))
        docs = sorted((out / "documents").glob("part-*.parquet"))
        victim = rng.randrange(len(pages))
        if kind == "pages file truncated":
            pages[victim].write_bytes(pages[victim].read_bytes()[: pages[victim].stat().st_size // 2])
        elif kind == "pages file zeroed":
            pages[victim].write_bytes(b"\0" * pages[victim].stat().st_size)
        elif kind == "pages file deleted (documents kept)":
            pages[victim].unlink()
        elif kind == "documents file truncated":
            docs[victim].write_bytes(docs[victim].read_bytes()[:-40])
        elif kind == "runs file truncated":
            (run,) = sorted((out / "runs").glob("part-*.parquet"))
            run.write_bytes(run.read_bytes()[:50])
        elif kind == "malformed lease (heartbeat_at null)":
            (lease,) = sorted((out / "_docpipe" / "lease").glob("*.json"))
            record = json.loads(lease.read_text())
            record.update(heartbeat_at=None, released=False)
            lease.write_text(json.dumps(record))
        result = finish(run_args(target.src, out, "--shard-size", "8"))
        if result.returncode:
            tally.notes.append(f"{kind}: rerun exit {result.returncode}")
        target.extra = ("--shard-size", "8")

    scenario.__doc__ = f"A finished output with a {kind}; then the same command again."
    return scenario


DAMAGE = ("pages file truncated", "pages file zeroed", "pages file deleted (documents kept)",
          "documents file truncated", "runs file truncated", "malformed lease (heartbeat_at null)")

NEW_SCENARIOS: dict[str, Callable[[Target, random.Random, Tally], None]] = {
    "stall past TTL at commit, takeover (local)": stall_at_commit,
    "stall past TTL at commit, takeover (S3, moto)": stall_at_commit,
    "stall past TTL while planning, other shard size": stall_while_planning,
    "second run from another PID namespace": other_pid_namespace,
    "files rewritten/deleted/added mid-run": files_changed_mid_run,
    "files rewritten/deleted/added after a run": files_changed_after,
    **{kind: _damaged(kind) for kind in DAMAGE},
}


class _S3:
    """A moto S3 server on 127.0.0.1 for the S3 rows (stopped at the end)."""

    def __init__(self) -> None:
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        self.server.start()
        self.options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        import s3fs

        s3fs.S3FileSystem(**self.options).mkdir("faults")

    def stop(self) -> None:
        self.server.stop()


SCENARIOS: dict[str, Callable[[Path, Path, random.Random, Tally], None]] = {
    "kill -9 run x3, rerun": kill_and_rerun,
    "prep workers killed mid-document": kill_workers,
    "2 runs, other shard sizes (wait)": concurrent_other_shard_size,
    "2 runs at once (refused)": concurrent_refused,
    "Ctrl-C, rerun": ctrl_c_and_rerun,
    "rerun with other settings": rerun_other_settings,
}


# ---- issue 19, files and names (h19fs): nothing outside the output, every file accounted for,
# bounded costs, secrets and ids. Each scenario says what it saw in its notes. -----------------

_LINKED_FOLDERS = ("documents", "pages", "runs", "_docpipe", "_docpipe/lease", "_docpipe/plans", "_docpipe/staging",
                   "_docpipe/staging/<gen>", "_docpipe/staging/<gen>/pages", "_docpipe/fenced", "_docpipe/quarantine",
                   "_docpipe/compactions", "_docpipe/reports")


def _tree(folder: Path) -> dict[str, object]:
    """Every path under `folder`: file bytes, link targets, folders."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            out[rel] = ("link", os.readlink(path)) if path.is_symlink() else (
                path.read_bytes() if path.is_file() else "dir")
    return out


def _add_decoys(scratch: Path) -> None:
    """What a scratch disk or home folder might hold, named like docpipe's own files (never
    over a name already there)."""
    (scratch / ".ssh").mkdir()
    (scratch / ".ssh" / "id_ed25519").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for gen in ("g000000000001", "g000000000002", "nolease", "g000000000001-0123abcd"):
        if (scratch / gen).exists():
            continue
        for table in ("pages", "documents"):
            (scratch / gen / table).mkdir(parents=True)
            (scratch / gen / table / "part-decoy.parquet").write_bytes(b"not docpipe's")
    (scratch / "part-decoy.parquet").write_bytes(b"someone's data")
    old_temp = scratch / ".part-decoy.parquet.tmp-0123"
    old_temp.write_bytes(b"old")
    os.utime(old_temp, (1, 1))


def symlinked_internal_folders(target: Target, rng: random.Random, tally: Tally) -> None:
    """A finished output; each internal folder in turn is made a symbolic link to a scratch
    folder (holding what the folder held, a .ssh/ and decoys named like docpipe's files), and
    `run`, `verify --repair` and `compact` are run on it; then the folder is put back."""
    out = Path(target.url)
    finish(run_args(target.src, out, "--shard-size", "8"))
    gen = sorted(p.name for p in (out / "_docpipe" / "staging").iterdir())[-1]
    commands = (run_args(target.src, out, "--shard-size", "8"), [DOCPIPE, "verify", str(out), "--repair"],
                [DOCPIPE, "compact", str(out)])
    calls = refused = changed = 0
    for rel in (f.replace("<gen>", gen) for f in _LINKED_FOLDERS):
        folder, scratch = out / rel, Path(tempfile.mkdtemp(prefix="docpipe-scratch-"))
        folder.parent.mkdir(parents=True, exist_ok=True)
        moved = []
        if folder.exists():
            for item in folder.iterdir():
                shutil.move(str(item), scratch / item.name)
                moved.append(item.name)
            folder.rmdir()
        _add_decoys(scratch)
        folder.symlink_to(scratch, target_is_directory=True)
        before = _tree(scratch)
        for args in commands:
            result = finish(args)
            calls += 1
            refused += result.returncode == 2 and result.stderr.decode().count("\n") == 1
        after = _tree(scratch)
        changed += sum(1 for key in set(before) | set(after) if before.get(key) != after.get(key))
        if folder.is_symlink():  # (code that followed links may have moved the link itself away)
            folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for name in moved:  # what is left of it (code that followed the link may have moved or removed some)
            if os.path.lexists(scratch / name):
                shutil.move(str(scratch / name), folder / name)
        shutil.rmtree(scratch, ignore_errors=True)
    tally.notes.append(f"{calls} commands over {len(_LINKED_FOLDERS)} linked folders: {refused} refused in one line "
                       f"with exit 2, {changed} paths changed outside the output")
    target.extra = ("--shard-size", "8")


_ODD_NAMES = ("new\nline.pdf", "tab\there.pdf", "esc\x1b[31m.pdf", "x" * 251 + ".pdf", "caf\u00e9.pdf",
              "cafe\u0301.pdf", "Case.pdf", "case.pdf", "rtl\u202efdp.pdf", "<img src=x onerror=alert(1)>.pdf",
              "ends in space.pdf ")


def odd_names_links_and_hidden_files(target: Target, rng: random.Random, tally: Tally) -> None:
    """Odd names (one row each, exact source_uri), a Latin-1 name, a link to a file (a row), a
    dangling link (an `unreadable` row), hidden files, a FIFO, a link to a folder, another
    extension (counted as skipped); after the first run a processed file turns into a
    dangling link (its one row says so)."""
    from tests.docs_factory import make_pdf

    src = target.src
    for i, name in enumerate(_ODD_NAMES):
        make_pdf(src / name, 1 + i % 2, f"odd name {i}")
        target.expected[name] = 1 + i % 2
    with open(os.fsencode(src) + b"/caf\xe9-latin1.pdf", "wb") as fh:
        fh.write((src / _ODD_NAMES[0]).read_bytes() + b"\n%latin-1\n")
    target.expected["caf%E9-latin1.pdf"] = 1  # the last segment of its file:// source_uri
    first = sorted(n for n in target.expected if n.startswith("doc-"))[0]
    (src / "link-to-a-doc.pdf").symlink_to(src / first)
    target.expected["link-to-a-doc.pdf"] = 0  # the same bytes as its target: a duplicate row
    (src / "dangling.pdf").symlink_to(src / "nowhere.pdf")
    target.expected["dangling.pdf"] = 0
    (src / ".hidden.pdf").write_bytes((src / first).read_bytes())
    (src / ".git").mkdir()
    (src / ".git" / "x.pdf").write_bytes((src / first).read_bytes())
    (src / "notes.txt").write_text("not a document")
    os.mkfifo(src / "pipe.pdf")
    (src / "a-linked-folder").symlink_to(Path(tempfile.mkdtemp(prefix="docpipe-elsewhere-")), target_is_directory=True)
    skips = {"extension": 1, "hidden": 2, "special": 1, "symlinked_folder": 1}
    out = target.url
    codes = [finish(run_args(src, out, "--shard-size", "8")).returncode]
    victim = sorted(n for n in target.expected if n.startswith("doc-"))[1]
    (src / victim).unlink()
    (src / victim).symlink_to(src / "gone.pdf")
    target.expected[victim] = 0  # latest wins: its one row says unreadable, its pages go
    codes.append(finish(run_args(src, out, "--shard-size", "8")).returncode)
    runs = sorted(read_rows(out, "runs"), key=lambda r: r["started_at"])
    seen = [json.loads(r["counts"] or "{}").get("files_skipped") for r in runs]
    tally.notes.append(f"exits {codes}; files skipped by reason per run {seen} (expected {skips} each)")
    target.extra = ("--shard-size", "8")


def cpu_bomb_short_timeout(target: Target, rng: random.Random, tally: Tally) -> None:
    """A few KB of PDF whose page takes minutes to draw, with --document-timeout-s 5: three
    runs; the bomb may cost one timeout in all."""
    from tests.docs_factory import cpu_bomb_pdf

    (target.src / "bomb.pdf").write_bytes(cpu_bomb_pdf(segments=100_000))
    target.expected["bomb.pdf"] = 0
    target.extra = ("--shard-size", "8", "--document-timeout-s", "5", "--prep-workers", "1")
    spent = []
    for _ in range(3):
        t0 = time.monotonic()
        finish(run_args(target.src, target.url, *target.extra))
        spent.append(time.monotonic() - t0)
    [bomb] = [d for d in read_rows(target.url, "documents") if d["source_uri"].endswith("/bomb.pdf")]
    tally.notes.append(f"runs took {', '.join(f'{s:.0f}' for s in spent)} s; the bomb's row: {bomb['status']} "
                       f"{bomb['error_type']}, retryable {bomb['error_retryable']}, attempt {bomb['attempt']}")


def report_on_replaced_sources(target: Target, rng: random.Random, tally: Tally) -> None:
    """A finished output whose sources are then replaced: one PNG by a 169 MP PNG (over the
    run's decode limit), one PDF by a CPU-bomb PDF; `docpipe report` (timed, peak RSS of its
    process tree) must not decode either."""
    from tests.docs_factory import bomb_png, cpu_bomb_pdf
    from tests.prefect_support import make_png

    src = target.src
    make_png(src / "scan.png", "a scan")
    target.expected["scan.png"] = 1
    finish(run_args(src, target.url, "--shard-size", "8"))
    (src / "scan.png").write_bytes(bomb_png(13_000, 13_000))
    victim = sorted(n for n in target.expected if n.startswith("doc-"))[0]
    (src / victim).write_bytes(cpu_bomb_pdf(segments=100_000))
    target.expected["scan.png"] = target.expected[victim] = 0  # their new versions: image_too_large, timeout
    target.extra = ("--shard-size", "8", "--document-timeout-s", "5", "--prep-workers", "1")
    html = Path(tempfile.mkdtemp(prefix="docpipe-report-")) / "r.html"
    t0 = time.monotonic()
    result = finish(["/usr/bin/time", "-f", "peak-rss-kb %M", DOCPIPE, "report", target.url, "--html", str(html)])
    seconds = time.monotonic() - t0
    err = result.stderr.decode(errors="replace")
    peak = next((int(line.split()[1]) for line in err.splitlines() if line.startswith("peak-rss-kb")), -1)
    page = html.read_text() if html.exists() else ""
    tally.notes.append(f"report exit {result.returncode}, {seconds:.1f} s, peak RSS {peak / 1024:.0f} MB; "
                       f"{page.count('the source changed since the run')} cards 'source changed', "
                       f"{page.count('data:image/jpeg')} thumbnails")


def credentials_and_run_ids(target: Target, rng: random.Random, tally: Tally) -> None:
    """Credentials in the S3 URL given to run (as source and as output), verify, verify --repair,
    compact and report; run ids with '../' and a backtick. None may print the credentials or
    take the lease."""
    key, secret = "AKIAFAKEKEY0000019", "s3cr3t-in-the-url-19"
    bucket_path = target.url[len("s3://"):]
    secret_url = f"s3://{key}:{secret}@{bucket_path}"
    opts = _option_args(target)
    commands = [run_args(target.src, secret_url, *opts), run_args(f"s3://{key}:{secret}@nowhere-bucket/in", target.url,
                                                                  *opts),
                [DOCPIPE, "verify", secret_url, *opts], [DOCPIPE, "verify", secret_url, "--repair", *opts],
                [DOCPIPE, "compact", secret_url, *opts],
                [DOCPIPE, "report", secret_url, "--html", str(Path(tempfile.mkdtemp()) / "r.html"), *opts]]
    codes, leaks, long_lines = [], 0, 0
    for args in commands:
        result = finish(args)
        err = result.stderr.decode(errors="replace") + result.stdout.decode(errors="replace")
        codes.append(result.returncode)
        leaks += key in err or secret in err
        long_lines += result.stderr.decode(errors="replace").count("\n") > 1
    bad = [finish(run_args(target.src, target.url, "--run-id", rid, *opts)).returncode for rid in ("../x", "a`b")]
    import s3fs

    fs = s3fs.S3FileSystem(**(target.options or {}))
    fs.invalidate_cache()
    leases = len(fs.glob(f"{bucket_path}/_docpipe/lease/*.json"))
    tally.notes.append(f"{len(commands)} commands with credentials in a URL: exits {codes}, {leaks} printed them, "
                       f"{long_lines} printed more than one line; bad run ids: exits {bad}, lease records {leases}")
    finish(run_args(target.src, target.url, *opts))


ISSUE19_FS_SCENARIOS: dict[str, Callable[[Target, random.Random, Tally], None]] = {
    "symlinked internal folders: run, verify --repair, compact": symlinked_internal_folders,
    "odd names, links, hidden and special files": odd_names_links_and_hidden_files,
    "CPU-bomb PDF, --document-timeout-s 5, 3 runs": cpu_bomb_short_timeout,
    "report on sources replaced by a 169 MP PNG and a CPU bomb": report_on_replaced_sources,
    "credentials in the URL, bad run ids (S3, moto)": credentials_and_run_ids,
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
    every = {**SCENARIOS, **NEW_SCENARIOS, **ISSUE19_FS_SCENARIOS, **NET_SCENARIOS}
    chosen = {k: v for k, v in every.items() if not args.only or any(o in k for o in args.only)}
    rows, net_rows = [], []
    s3 = _S3() if any("S3" in k for k in chosen) else None
    net = NetEnv(s3, _fault_proxy(s3) if s3 is not None and any(k in NET_SCENARIOS for k in chosen) else None)
    try:
        with tempfile.TemporaryDirectory(prefix="docpipe-faults-") as tmp:
            corpus = Path(tmp) / "in"
            expected = make_corpus(corpus, args.docs)
            for name, scenario in chosen.items():
                if name in NET_SCENARIOS:  # issue 19's rows: their own table
                    net_rows.append(net_row(name, tmp, corpus, expected, rng, args.repeat, net, len(net_rows)))
                    print(f"... {name}: {net_rows[-1][1]}", file=sys.stderr, flush=True)
                    continue
                tally = Tally()
                t0 = time.monotonic()
                for i in range(args.repeat):
                    STDERR.clear()
                    out = Path(tmp) / f"out-{len(rows)}-{i}"
                    if name in SCENARIOS:
                        scenario(corpus, out, rng, tally)
                        check(out, expected, tally, corpus)
                        continue
                    src = Path(tmp) / f"in-{len(rows)}-{i}"
                    shutil.copytree(corpus, src)  # the changed-file rows change their own copy
                    target = Target(str(out), dict(expected), src)
                    if "S3" in name:
                        assert s3 is not None
                        target = Target(f"s3://faults/out-{len(rows)}-{i}", dict(expected), src, s3.options)
                    scenario(target, rng, tally)
                    settle(target, tally)
                rows.append((name, tally, time.monotonic() - t0))
                print(f"... {name}: {tally}", file=sys.stderr, flush=True)
    finally:
        if net.proxy is not None:
            net.proxy.stop()  # type: ignore[attr-defined]
        if s3 is not None:
            s3.stop()
    print(f"seed {seed}; {args.docs} PDFs, {sum(expected.values())} pages per corpus; reruns: plain reruns after "
          "the fault until the output was exact (the most any run needed)")
    header = ("scenario", "runs", "pages expected", "pages found", "duplicates", "lost", "doc rows off",
              "tracebacks", "reruns", "stray files", "quarantined", "orphan procs", "seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, t, seconds in rows:
        cells = (name, t.runs, t.pages_expected, t.pages_found, t.duplicates, t.lost, t.bad_document_rows,
                 t.tracebacks, t.reruns, t.stray_files, t.quarantined, t.orphans, f"{seconds:.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    notes = [(name, t.notes) for name, t, _ in rows if t.notes]
    for name, items in notes:
        print(f"note: {name}: {'; '.join(items)}")
    print_net_table(net_rows)


# ==== Issue 19, network half: lost replies, stop signals, skewed clocks ========================
# Own rows, printed as their own table: besides what the rows above count, the exit codes of
# the runs that met the fault, "claimed ok over a missing page" (pages missing from the output
# right after a run that ended `completed` with exit 0: must be 0), and what was injected.
# The S3 rows put `pipeline.testing.s3_faults.FaultProxy` (127.0.0.1) between docpipe and moto;
# the clock rows run docpipe under libfaketime (`faketime -f +3h`), skipped when it is missing.


@dataclass
class NetTally(Tally):
    exits: collections.Counter = field(default_factory=collections.Counter)  # exit codes of the faulted runs
    false_success: int = 0  # pages missing right after a run that exited 0
    injected: collections.Counter = field(default_factory=collections.Counter)
    waited_s: float | None = None  # the longest a replacement run took to take the output
    seeds: list[int] = field(default_factory=list)  # the fault proxy's seeds (S3 rows)


@dataclass
class NetEnv:
    s3: "_S3 | None"
    proxy: object | None  # FaultProxy in front of s3, when S3 rows run


def _net_run(tally: NetTally, target: Target, args: list[str], env: dict[str, str] | None = None,
             options: dict | None = None) -> subprocess.CompletedProcess[bytes]:
    """One run that meets the fault: its exit code tallied, and if it exited 0, the pages
    missing from the output right after it (read directly, not through the faults)."""
    if options:
        args = [*args, "--storage-options", json.dumps(options)]
    result = finish(args, env)
    tally.exits[result.returncode] += 1
    if result.returncode == 0:
        tally.false_success += problems(target)["lost"]
    return result


def _s3_row(plan_of: Callable[[random.Random], object], shard_size: str, attempts: int = 3):
    def scenario(target: Target, rng: random.Random, tally: NetTally, env: NetEnv) -> None:
        from pipeline.testing.s3_faults import FaultPlan  # noqa: F401 - plan_of builds one

        assert env.proxy is not None and target.options is not None
        plan = plan_of(rng)
        env.proxy.set_plan(plan)  # type: ignore[attr-defined]
        tally.seeds.append(plan.seed)  # type: ignore[attr-defined]
        before = collections.Counter(env.proxy.injected)  # type: ignore[attr-defined]
        options = {**target.options, "endpoint_url": env.proxy.url}  # type: ignore[attr-defined]
        args = run_args(target.src, target.url, "--shard-size", shard_size)
        for _ in range(attempts):  # the nightly job's own retries, all through the faults
            if _net_run(tally, target, args, options=options).returncode == 0:
                break
        tally.injected.update(collections.Counter(env.proxy.injected) - before)  # type: ignore[attr-defined]
        env.proxy.set_plan(FaultPlan())  # type: ignore[attr-defined]  # the reruns that settle it are plain
        target.extra = ("--shard-size", shard_size)

    return scenario


def _fault_proxy(s3: "_S3") -> object:
    import logging

    from pipeline.testing.s3_faults import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    return FaultProxy(s3.options["endpoint_url"]).start()


def _plan(**kw):
    from pipeline.testing.s3_faults import FaultPlan

    return lambda rng: FaultPlan(seed=rng.randrange(1 << 30), **kw)


def _lease_released(out: Path) -> bool:
    leases = sorted((out / "_docpipe" / "lease").glob("*.json"))
    return bool(leases) and json.loads(leases[-1].read_text()).get("released") is True


def _stop_signal(sig: int, to_group: bool):
    def scenario(target: Target, rng: random.Random, tally: NetTally, env: NetEnv) -> None:
        out = Path(target.url)
        goal = rng.randint(1, max(1, len(target.expected) // 8))  # before half of its shards (of 4) are done
        proc = subprocess.Popen(run_args(target.src, out, "--shard-size", "4", "--prep-workers", "2"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        wait_for(lambda: committed(out) >= goal or proc.poll() is not None)
        below = descendants(proc.pid)
        try:
            if to_group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:  # it had finished
            pass
        _, err = proc.communicate(timeout=300)
        text = err.decode(errors="replace")
        STDERR.append(text)
        tally.exits[proc.returncode] += 1
        tally.orphans += len(wait_gone(below, 5.0))
        lines = text.strip().splitlines()
        runs = read_rows(str(out), "runs")
        if proc.returncode == 0:  # it had finished before the signal came
            tally.notes.append("finished before the signal")
        elif (proc.returncode != 128 + sig or len(lines) != 1 or not _lease_released(out)
              or [r["status"] for r in runs] != ["interrupted"]):
            tally.notes.append(f"exit {proc.returncode}, {len(lines)} lines, lease released {_lease_released(out)}, "
                               f"runs {[r['status'] for r in runs]}")
        code = _replacement(tally, ["unshare", "--pid", "--fork", *run_args(target.src, out, "--shard-size", "4")],
                            out)
        if code:
            tally.notes.append(f"replacement from another PID namespace exit {code}")
        target.extra = ("--shard-size", "4")

    return scenario


def _replacement(tally: NetTally, args: list[str], out: Path, env: dict[str, str] | None = None) -> int:
    """Run `args` (a run from another PID namespace) to its end; tally how long it took to take
    the output (a lease generation newer than the ones there) and its exit code."""
    known = {p.name for p in (out / "_docpipe" / "lease").glob("*.json")}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env)
    def taken() -> bool:
        return bool({p.name for p in (out / "_docpipe" / "lease").glob("*.json")} - known)

    wait_for(lambda: proc.poll() is not None or taken(), timeout_s=600)
    if taken():  # a run that never took it (exit 3) has no figure here; its exit code says it
        tally.waited_s = max(tally.waited_s or 0.0, time.monotonic() - t0)
    _, err = proc.communicate(timeout=1800)
    STDERR.append(err.decode(errors="replace"))
    tally.exits[proc.returncode] += 1
    return proc.returncode


def _faketime(offset: str) -> list[str] | None:
    return ["faketime", "-f", offset] if shutil.which("faketime") else None


def clock_ahead_killed(target: Target, rng: random.Random, tally: NetTally, env: NetEnv) -> None:
    """A run on a machine 3 h ahead is SIGKILLed mid-run; a run from another PID namespace with
    the right clock waits for the output (--wait-for-output-s 60, lease TTL 4 s)."""
    fake = _faketime("+3h")
    if fake is None:
        tally.notes.append("faketime not installed: skipped")
        return
    out = Path(target.url)
    ttl = {**os.environ, "DOCPIPE_LEASE_TTL_S": TTL_S}
    proc = subprocess.Popen([*fake, *run_args(target.src, out, "--shard-size", "4")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True, env=ttl)
    goal = rng.randint(1, max(1, len(target.expected) // 8))
    wait_for(lambda: committed(out) >= goal or proc.poll() is not None)
    below = descendants(proc.pid)
    if proc.poll() is not None:
        tally.notes.append("finished before the kill")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tally.orphans += len(wait_gone(below, 5.0))
    code = _replacement(tally, ["unshare", "--pid", "--fork",
                                *run_args(target.src, out, "--shard-size", "4", "--wait-for-output-s", "60")],
                        out, ttl)
    if code == 0:
        tally.false_success += problems(target)["lost"]
    else:
        tally.notes.append(f"replacement exit {code}")
    target.extra = ("--shard-size", "4")


def clock_ahead_settings(target: Target, rng: random.Random, tally: NetTally, env: NetEnv) -> None:
    """A run on a machine 3 h ahead writes the output; a later run (right clock) redoes it with
    other settings (--max-dpi 150 --reprocess). The latest run is the later one: its settings
    are accepted (exit 0), the superseded ones refused (exit 2)."""
    fake = _faketime("+3h")
    if fake is None:
        tally.notes.append("faketime not installed: skipped")
        return
    out = Path(target.url)
    first = finish([*fake, *run_args(target.src, out, "--shard-size", "8")])
    later = finish(run_args(target.src, out, "--shard-size", "8", "--max-dpi", "150", "--reprocess"))
    same = _net_run(tally, target, run_args(target.src, out, "--shard-size", "8", "--max-dpi", "150"))
    old = finish(run_args(target.src, out, "--shard-size", "8"))
    tally.exits[old.returncode] += 1
    if (first.returncode, later.returncode, same.returncode, old.returncode) != (0, 0, 0, 2):
        tally.notes.append(f"exits {first.returncode}/{later.returncode}/{same.returncode}/{old.returncode} "
                           "(expected 0/0/0/2)")
    target.extra = ("--shard-size", "8", "--max-dpi", "150")


NET_SCENARIOS: dict[str, Callable[[Target, random.Random, NetTally, NetEnv], None]] = {
    "S3: 25% of first conditional PUTs answered 500 after the write": _s3_row(
        _plan(conditional_after=0.25, kinds=("500",)), "4"),
    "S3: 25% of first conditional PUTs dropped after the write": _s3_row(
        _plan(conditional_after=0.25, kinds=("drop",)), "4"),
    "S3: 9% of requests 503/500/dropped, before or after S3 ran them": _s3_row(
        _plan(before=0.045, after=0.045), "4"),
    "S3: 10% of requests delayed 3-8 s": _s3_row(_plan(delay=0.10), "32"),
    "SIGTERM mid-run, new pod at once": _stop_signal(signal.SIGTERM, False),
    "SIGTERM to the process group, new pod at once": _stop_signal(signal.SIGTERM, True),
    "SIGHUP mid-run, new pod at once": _stop_signal(signal.SIGHUP, False),
    "clock 3 h ahead, killed; new pod waits for the output": clock_ahead_killed,
    "clock 3 h ahead, then a later run's settings": clock_ahead_settings,
}


LATEST_ONLY = {"clock 3 h ahead, then a later run's settings"}  # rows whose output holds two settings
AT_LEAST = {"S3: 9% of requests 503/500/dropped, before or after S3 ran them": 5}  # several seeds, whatever --repeat


@contextlib.contextmanager
def _rows_of_the_latest_settings(target: Target):
    """While settling a row whose output holds rows of two settings (a --reprocess run), the
    checks read only the rows of the latest run's settings (as the README's query does)."""
    from pipeline.dataset import Dataset

    global read_rows
    runs = Dataset(target.url, target.options).read_runs()
    fingerprint = runs[-1]["config_fingerprint"] if runs else None
    plain = read_rows

    def rows(url, table, options=None):  # noqa: ANN001, ANN202
        return [r for r in plain(url, table, options) if table == "runs" or r["config_fingerprint"] == fingerprint]

    read_rows = rows
    try:
        yield
    finally:
        read_rows = plain


def net_row(name: str, tmp: str, corpus: Path, expected: dict[str, int], rng: random.Random, repeat: int,
            env: NetEnv, index: int) -> tuple[str, NetTally, float]:
    scenario = NET_SCENARIOS[name]
    tally = NetTally()
    t0 = time.monotonic()
    for i in range(max(repeat, AT_LEAST.get(name, 0))):
        STDERR.clear()
        src = Path(tmp) / f"in-net-{index}-{i}"
        shutil.copytree(corpus, src)
        target = Target(str(Path(tmp) / f"out-net-{index}-{i}"), dict(expected), src)
        if name.startswith("S3"):
            assert env.s3 is not None
            target = Target(f"s3://faults/out-net-{index}-{i}", dict(expected), src, env.s3.options)
        scenario(target, rng, tally, env)
        if "faketime not installed: skipped" in tally.notes:
            break
        with _rows_of_the_latest_settings(target) if name in LATEST_ONLY else contextlib.nullcontext():
            settle(target, tally)
    return name, tally, time.monotonic() - t0


def print_net_table(rows: list[tuple[str, NetTally, float]]) -> None:
    if not rows:
        return
    print()
    print("Lost replies, stop signals and skewed clocks: *exits* are the exit codes of the runs that met the "
          "fault and of the replacement runs (code x count); *claimed ok over a missing page* counts pages missing "
          "right after a run that exited 0; *took over s*: the longest a replacement run (another PID namespace) "
          "took to take the output.")
    header = ("scenario", "runs", "pages expected", "pages found", "lost", "duplicates", "doc rows off", "exits",
              "claimed ok over a missing page", "tracebacks", "reruns", "orphan procs", "took over s", "injected",
              "seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, t, seconds in rows:
        exits = ", ".join(f"{code}x{n}" for code, n in sorted(t.exits.items()))
        injected = ", ".join(f"{k} {n}" for k, n in sorted(t.injected.items())) or "-"
        took = "-" if t.waited_s is None else f"{t.waited_s:.1f}"
        cells = (name, t.runs, t.pages_expected, t.pages_found, t.lost, t.duplicates, t.bad_document_rows, exits,
                 t.false_success, t.tracebacks, t.reruns, t.orphans, took, injected, f"{seconds:.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for name, t, _ in rows:
        if t.notes or t.seeds:
            seeds = [f"fault seeds {', '.join(map(str, t.seeds))}"] if t.seeds else []
            print(f"note: {name}: {'; '.join(seeds + t.notes)}")


if __name__ == "__main__":
    main()
