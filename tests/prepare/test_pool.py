"""The prep worker pool under real faults: workers killed by signals, crashing, dying at
start-up, a parent killed with SIGKILL. Real processes, real PDFs, nothing stubbed in the pool.

Each test checks the pool's promise to its consumer (see `tests.prep_faults.collect`): after
the consumer honours `DocumentRetry`, every page of every document is kept exactly once,
and every document ends with exactly one `DocumentDone`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import RunConfig
from pipeline.prepare import DocumentDone, PrepPool, PrepSettings, PrepWorkersFailing
from pipeline.records import DocStatus, DocumentRef
from tests.docs_factory import text_pdf
from tests.prep_faults import FaultyBuilder, StartupCrash, collect, pid_alive, wait_gone

REPO = Path(__file__).resolve().parents[2]


def write_pdfs(folder: Path, pages: dict[str, int]) -> list[DocumentRef]:
    """One small PDF per name with that many pages; refs in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for name, n in sorted(pages.items()):
        data = text_pdf(n, size=(120.0, 120.0)) + f"%{name}\n".encode()  # distinct bytes per file
        path = folder / name
        path.write_bytes(data)
        refs.append(DocumentRef(str(path), hashlib.sha256(data).hexdigest(), len(data), "application/pdf"))
    return refs


def settings(tmp_path: Path, builder=None, **cfg) -> PrepSettings:
    cfg.setdefault("prep_workers", 2)
    return PrepSettings(RunConfig(source=str(tmp_path), output=str(tmp_path / "out"), progress=False, **cfg), builder)


def assert_complete(got, refs, pages: dict[str, int], except_uri: str | None = None) -> None:
    assert got.breaches == []
    assert set(got.outcomes) == {r.uri for r in refs}
    assert all(len(v) == 1 for v in got.outcomes.values())
    for ref in refs:
        if ref.uri == except_uri:
            continue
        name = Path(ref.uri).name
        assert got.page_numbers(ref.uri) == list(range(1, pages[name] + 1)), name
        assert got.outcomes[ref.uri][0].status is DocStatus.OK, name


def test_a_worker_killed_mid_document_reruns_it_and_every_page_arrives_once(tmp_path: Path):
    pages = {"a.pdf": 3, "b.pdf": 6, "c.pdf": 3}
    refs = write_pdfs(tmp_path / "in", pages)
    builder = FaultyBuilder(state_dir=str(tmp_path), delay_s=0.15, delay_on="b.pdf")
    pool = PrepPool(settings(tmp_path, builder), workers=2)
    b_uri = next(r.uri for r in refs if r.uri.endswith("b.pdf"))
    killed = []

    def kill_b_once(event, got):
        if not killed and getattr(event, "ref_uri", None) == b_uri:
            pid = pool.worker_pid_for(b_uri)
            os.kill(pid, signal.SIGKILL)  # mid-document: b has 5 slow pages to go
            killed.append(pid)

    got = collect(pool.run(refs), kill_b_once)
    assert killed and not pid_alive(killed[0])
    assert_complete(got, refs, pages)
    (retry,) = got.retries[b_uri]
    assert retry.attempt == 2 and retry.reason.type == "worker_crashed" and "SIGKILL" in retry.reason.message
    assert retry.reason.retryable
    assert {p.attempt for p in got.kept[b_uri]} == {2}
    assert got.pages_seen > sum(pages.values())  # attempt 1 did deliver pages, which were dropped
    (b,) = got.outcomes[b_uri]
    assert (b.pages_ok, b.pages_failed, b.error) == (6, 0, None)
    assert builder.count("b.pdf", ".starts") == 2
    assert pool.workers == []  # not keep_alive: closed at the end


def test_documents_that_kill_every_worker_end_after_two_attempts_and_a_timeout_after_one(tmp_path: Path):
    pages = {"fine-1.pdf": 2, "poison-segv.pdf": 3, "fine-2.pdf": 4, "poison-exit.pdf": 2, "fine-3.pdf": 1, "slow.pdf": 2}
    refs = write_pdfs(tmp_path / "in", pages)
    # poison-segv.pdf segfaults its worker on page 2 (as MuPDF may); poison-exit.pdf exits with
    # code 13 there; slow.pdf takes a minute per page from page 2 on (past the timeout)
    builder = FaultyBuilder(
        state_dir=str(tmp_path), crash_on="poison", crash_page=2, crash_mode="name",
        delay_s=60, delay_on="slow", delay_from_page=2,
    )
    got = collect(PrepPool(settings(tmp_path, builder, document_timeout_s=3.0), workers=2).run(refs))
    poisons = {r.uri: r for r in refs if "poison" in r.uri}
    assert got.breaches == [] and set(got.outcomes) == {r.uri for r in refs}
    slow = next(r.uri for r in refs if "slow" in r.uri)
    (outcome,) = got.outcomes[slow]
    assert slow not in got.retries  # a timeout is not transient: no fresh worker for it (ledger.retry_in_fresh_worker)
    assert builder.count("slow.pdf", ".starts") == 1
    assert outcome.error.type == "document_timeout" and "attempt" not in outcome.error.message
    assert outcome.status is DocStatus.PARTIAL and got.page_numbers(slow) == [1] and got.kept[slow][0].attempt == 1
    for ref in refs:
        name = Path(ref.uri).name
        (outcome,) = got.outcomes[ref.uri]
        if ref.uri == slow:
            continue
        if ref.uri not in poisons:
            assert outcome.status is DocStatus.OK and got.page_numbers(ref.uri) == list(range(1, pages[name] + 1))
            continue
        assert builder.count(name, ".starts") == 2, name  # exactly two attempts, in two workers
        assert [r.attempt for r in got.retries[ref.uri]] == [2]
        err = outcome.error
        says = "SIGSEGV" if "segv" in name else "exit code 13"
        assert err.type == "worker_crashed" and err.retryable and says in err.message, err
        assert "attempt 2 of 2" in err.message
        # the pages of the last attempt stand: page 1 rendered before the crash on page 2
        assert outcome.status is DocStatus.PARTIAL and outcome.pages_ok == 1
        assert got.page_numbers(ref.uri) == [1] and got.kept[ref.uri][0].attempt == 2


def test_a_worker_dying_before_it_began_or_while_idle_costs_no_document_anything(tmp_path: Path):
    pages = {"a-fast.pdf": 1, "b-slow.pdf": 4, "c-slow.pdf": 4}
    refs = write_pdfs(tmp_path / "in", pages)
    builder = FaultyBuilder(state_dir=str(tmp_path), delay_s=0.5, delay_on="slow")
    pool = PrepPool(settings(tmp_path, builder), workers=3)
    early, idle = [], []

    def kill_second_worker_at_birth():  # it was given b-slow.pdf but is still importing
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not early:
            workers = list(pool.workers)
            if len(workers) >= 2:
                early.append(workers[1].process.pid)
                os.kill(early[0], signal.SIGKILL)
            time.sleep(0.001)

    def kill_the_idle_worker(event, got):
        if isinstance(event, DocumentDone) and "a-fast" in event.outcome.ref.uri and not idle:
            busy = {pool.worker_pid_for(r.uri) for r in refs if r.uri not in got.outcomes}
            if len(busy - {None}) == 2:  # both slow documents still running: a-fast's worker is idle
                idle.extend(p for p in pool.worker_pids() if p not in busy)
                os.kill(idle[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_second_worker_at_birth)
    killer.start()
    got = collect(pool.run(refs), kill_the_idle_worker)
    killer.join()
    assert len(early) == 1 and len(idle) == 1
    assert_complete(got, refs, pages)
    assert got.retries == {}  # neither death was any document's fault
    assert [builder.count(Path(r.uri).name, ".starts") for r in refs] == [1, 1, 1]


@pytest.mark.timeout(150)
def test_killed_workers_in_a_burst_of_240_documents_never_hang_nor_lose_a_page(tmp_path: Path):
    pages = {f"doc-{i:03d}.pdf": 1 for i in range(240)}
    refs = write_pdfs(tmp_path / "in", pages)
    pool = PrepPool(settings(tmp_path), workers=2, keep_alive=True)
    kills = []

    def kill_at(event, got):
        done = len(got.outcomes)
        if (done >= 40 and len(kills) == 0) or (done >= 150 and len(kills) == 1):
            pid = pool.worker_pids()[len(kills) % 2]
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)

    t0 = time.monotonic()
    got = collect(pool.run(refs), kill_at)
    assert len(kills) == 2 and wait_gone(kills, 5) == []
    assert_complete(got, refs, pages)
    assert got.duplicates() == 0 and sum(len(v) for v in got.kept.values()) == 240
    # every credit is back: with the workers, or free (none lost with the killed workers)
    assert pool._free + sum(w.credits for w in pool.workers) == pool.prefetch
    assert all(w.index is None for w in pool.workers) and len(pool.worker_pids()) == 2
    pool.close()
    assert time.monotonic() - t0 < 120


def test_workers_dying_at_start_up_stop_the_run_with_one_clear_error(tmp_path: Path, monkeypatch):
    refs = write_pdfs(tmp_path / "in", {"a.pdf": 1, "b.pdf": 1})
    spawned = []
    real_spawn = PrepPool._spawn
    monkeypatch.setattr(PrepPool, "_spawn", lambda self, i: spawned.append(i) or real_spawn(self, i))
    pool = PrepPool(settings(tmp_path, StartupCrash()), workers=2)
    t0 = time.monotonic()
    with pytest.raises(PrepWorkersFailing) as info:
        list(pool.run(refs))
    message = str(info.value)
    assert "start-up 3 times" in message and "exit code 17" in message and "__main__" in message
    assert "\n" not in message
    assert len(spawned) <= 4 and time.monotonic() - t0 < 60  # bounded: no endless respawning
    assert pool.workers == []


def test_a_script_without_main_guard_fails_fast_instead_of_respawning_forever(tmp_path: Path):
    refs = write_pdfs(tmp_path / "in", {"a.pdf": 2})
    script = tmp_path / "no_guard.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pipeline.config import RunConfig
            from pipeline.prepare import PrepPool, PrepSettings
            from pipeline.records import DocumentRef

            ref = DocumentRef({refs[0].uri!r}, {refs[0].doc_id!r}, {refs[0].size}, "application/pdf")
            cfg = RunConfig(source={str(tmp_path)!r}, output={str(tmp_path / "o")!r}, prep_workers=2)
            for event in PrepPool(PrepSettings(cfg), workers=2).run([ref]):
                print(type(event).__name__)
            """
        )
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.prepare.PrepWorkersFailing: prep workers died at start-up 3 times")
    assert 'if __name__ == "__main__":' in last
    assert "DocumentDone" not in proc.stdout
    assert time.monotonic() - t0 < 90


def test_workers_that_keep_dying_stop_the_run(tmp_path: Path):
    refs = write_pdfs(tmp_path / "in", {"p1.pdf": 1, "p2.pdf": 1, "p3.pdf": 1})
    builder = FaultyBuilder(crash_on="pdf", crash_mode="exit")  # every document kills its worker
    pool = PrepPool(settings(tmp_path, builder), workers=1, max_deaths_in_a_row=2)
    with pytest.raises(PrepWorkersFailing, match="3 prep workers died one after another"):
        collect(pool.run(refs))


def _start_child(tmp_path: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.prep_child", str(tmp_path / "in"), *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("where", ["main", "thread"])
def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path: Path, where):
    write_pdfs(tmp_path / "in", {"a.pdf": 3, "b.pdf": 3})
    child = _start_child(tmp_path, "--workers", "2", "--slow", "60", *(["--thread"] if where == "thread" else []))
    try:
        line = child.stdout.readline()
        assert line.startswith("PIDS"), (line, child.stderr.read() if child.poll() is not None else "")
        workers = [int(p) for p in line.split()[1:]]
        assert len(workers) == 2 and all(pid_alive(p) for p in workers)
        child.kill()  # SIGKILL: no atexit, no finalizers, nothing runs in the parent
        child.wait(10)
        assert wait_gone(workers, 5) == []
        # every process holding the child's stderr (workers, resource tracker) has exited
        _, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
    assert "leaked" not in err and "Traceback" not in err, err


def test_no_leaked_semaphores_even_when_the_parent_skips_all_cleanup(tmp_path: Path):
    write_pdfs(tmp_path / "in", {"a.pdf": 4, "b.pdf": 2, "c.pdf": 3})
    # A worker is killed mid-document, the run finishes, then the parent exits with
    # os._exit: a multiprocessing Queue or Lock would be reported leaked by the tracker.
    child = _start_child(tmp_path, "--workers", "2", "--slow", "0.2", "--kill-one", "--hard-exit")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "DONE pages=9 docs=3 retries=1 breaches=0" in out, out
    assert "leaked" not in err and "resource_tracker" not in err and "Traceback" not in err, err


def test_backpressure_bounds_prepared_pages_ahead_of_the_consumer(tmp_path: Path):
    refs = write_pdfs(tmp_path / "in", {"long-a.pdf": 25, "long-b.pdf": 25})
    builder = FaultyBuilder(state_dir=str(tmp_path))
    pool = PrepPool(settings(tmp_path, builder, prefetch_pages=6), workers=2)
    events = pool.run(refs)
    next(events)  # workers are running and the consumer holds one page, busy in the model
    built, still = 0, 0
    deadline = time.monotonic() + 20
    while still < 3 and time.monotonic() < deadline:  # until the workers stop making pages
        time.sleep(0.5)
        now = builder.count("long-a.pdf", ".pages") + builder.count("long-b.pdf", ".pages")
        built, still = now, (still + 1 if now == built else 0)
    # sent pages hold a credit each (6 in all); each worker may hold one more waiting for credit
    assert still == 3 and 1 <= built <= 6 + 2, built
    got = collect(events)
    assert got.breaches == [] and got.pages_seen == 49  # the first page was taken above
