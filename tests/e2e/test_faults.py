"""Exactly once under the faults a nightly pipeline meets, each run for real in subprocesses.

Two runs on one output (same or other shard size), a rerun with other settings, Ctrl-C, and
every broken setting failing before any work in one line with exit 2. Each scenario ends
by checking every page exactly once, no stray files, and no process left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.prep_faults import children_of, wait_gone
from tests.prefect_support import (
    BIN,
    expected_pages,
    make_corpus,
    page_key_counts,
    pages_by_name,
    read_rows,
    start_process,
    stray_files,
)

pytestmark = pytest.mark.slow

DOCPIPE = str(BIN / "docpipe")


def docpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCPIPE, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_args(src: Path, out: Path | str, *extra: str) -> list[str]:
    return ["run", str(src), "--output", str(out), "--no-progress", *extra]


def assert_exactly_once(out: Path, expected: dict[str, int]) -> None:
    pages = read_rows(str(out), "pages")
    docs = read_rows(str(out), "documents")
    counts = page_key_counts(pages)
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1][:5]
    assert pages_by_name(pages) == expected_pages(expected)
    assert sorted(Path(d["source_uri"]).name for d in docs) == sorted(expected)  # one row per document
    assert stray_files(out) == []


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    src = tmp_path / "in"
    return src, make_corpus(src, 40)


def test_a_second_run_on_a_busy_output_exits_at_once_and_nothing_is_written_twice(corpus, tmp_path: Path):
    src, expected = corpus
    out = tmp_path / "out"
    first = start_process("first", [DOCPIPE, *run_args(src, out, "--shard-size", "8")], os.environ, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 120
        while not (out / "_docpipe" / "lease").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the same job deployed twice with other settings: another shard size
        second = docpipe(*run_args(src, out, "--shard-size", "5"))
        assert second.returncode == 3, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by run" in lines[0] and "Traceback" not in second.stderr
        # one that is told to wait runs after the first and finds nothing left to do
        waiting = docpipe(*run_args(src, out, "--shard-size", "5", "--wait-for-output-s", "240"))
        assert waiting.returncode == 0, waiting.stderr
        assert first.popen.wait(timeout=240) == 0, first.log()[-2000:]
    finally:
        first.stop()
    assert_exactly_once(out, expected)
    runs = read_rows(str(out), "runs")
    assert sorted(r["status"] for r in runs) == ["completed", "completed"]  # the refused run never started
    by_run = {r["run_id"]: r["documents_processed"] for r in runs}
    assert sorted(by_run.values()) == [0, 40]


def test_a_rerun_with_other_settings_refuses_and_names_them(tmp_path: Path, tiny_model):
    src = tmp_path / "in"
    expected = make_corpus(src, 3)
    out = tmp_path / "out"
    assert docpipe(*run_args(src, out)).returncode == 0
    tiny = tiny_model("internvl")  # the session's (README's `docpipe make-tiny-model` runs in tests/docs)
    changed = docpipe(*run_args(src, out, "--model", str(tiny), "--max-new-tokens", "4"))
    assert changed.returncode == 2
    (line,) = changed.stderr.strip().splitlines()
    assert "max_new_tokens" in line and "model" in line and "--reprocess" in line
    # asked for, the new settings redo every document; old and new rows are told apart by fingerprint
    redo = docpipe(*run_args(src, out, "--model", str(tiny), "--max-new-tokens", "4", "--reprocess", "--device", "cpu"))
    assert redo.returncode == 0, redo.stderr
    pages = read_rows(str(out), "pages")
    fingerprints = {p["config_fingerprint"] for p in pages}
    assert len(fingerprints) == 2
    runs = sorted(read_rows(str(out), "runs"), key=lambda r: r["started_at"])
    latest = [p for p in pages if p["config_fingerprint"] == runs[-1]["config_fingerprint"]]
    assert max(page_key_counts(latest).values()) == 1
    assert pages_by_name(latest) == expected_pages(expected)
    assert all(p["description"] is not None for p in latest)
    assert runs[-1]["model_revision"].startswith("sha256:") and runs[-1]["reprocess"] is True


def test_ctrl_c_says_a_rerun_resumes_and_it_does(corpus, tmp_path: Path):
    src, expected = corpus
    out = tmp_path / "out"
    # A shell's background jobs (and so this test, under some runners) inherit SIGINT ignored;
    # a terminal's foreground job has it at its default, which is what is restored here.
    proc = subprocess.Popen([DOCPIPE, *run_args(src, out, "--shard-size", "1")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "documents").glob("part-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("docpipe: interrupted; finished shards are kept")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert wait_gone(workers, 5.0) == []
    (run,) = read_rows(str(out), "runs")
    assert run["status"] == "interrupted"
    again = docpipe(*run_args(src, out, "--shard-size", "1"))
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, expected)


def test_a_killed_run_leaves_no_worker_behind_and_the_next_run_takes_over_at_once(corpus, tmp_path: Path):
    src, expected = corpus
    out = tmp_path / "out"
    proc = subprocess.Popen([DOCPIPE, *run_args(src, out, "--shard-size", "2", "--prep-workers", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "documents").glob("part-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = children_of(proc.pid)
    assert workers, "the run had no worker processes"
    proc.kill()
    proc.wait()
    assert wait_gone(workers, 5.0) == []  # no orphans
    t0 = time.monotonic()
    again = docpipe(*run_args(src, out, "--shard-size", "2"))  # the dead run's lease is not waited for
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - t0 < 120
    assert_exactly_once(out, expected)


# ---- a broken setup fails before any work, in one line, with exit 2 -----------------------


def _setup_cases(tmp_path: Path, tiny: Path) -> dict[str, tuple[list[str], str]]:
    src = tmp_path / "in"
    make_corpus(src, 2)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    odd = tmp_path / "odd-model"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = str(tmp_path / "out")
    return {
        "missing source": (run_args(tmp_path / "nowhere", Path(out)), "source not found"),
        "output is a file": (run_args(src, a_file), "output"),
        "model folder is not a model": (run_args(src, Path(out), "--model", str(not_a_model)), "not a model"),
        "missing model path": (run_args(src, Path(out), "--model", str(tmp_path / "gone")), "not found"),
        "offline hub id": (run_args(src, Path(out), "--model", "nobody-here/no-such-model"), "cannot be resolved"),
        "unsupported model type": (run_args(src, Path(out), "--model", str(odd)), "not supported"),
        "GPU that does not exist": (run_args(src, Path(out), "--model", str(tiny), "--device", "3"), "--device 3"),
        "tiling policy against the model": (
            run_args(src, Path(out), "--model", str(tiny), "--tiling-policy", "minimax"), "contradicts the model"
        ),
    }


def test_every_broken_setting_fails_before_any_work(tmp_path: Path, tiny_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = _setup_cases(tmp_path, Path(tiny_model("internvl")))
    # each case is its own `docpipe` process (the real entry point's exit code and stderr), all at once
    # (they only read, and each must stop before any work)
    procs = {name: subprocess.Popen([DOCPIPE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env, stdin=subprocess.DEVNULL) for name, (args, _) in cases.items()}
    try:
        ended = {name: (proc.communicate(timeout=180)[1], proc.returncode) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, (args, expected) in cases.items():
        stderr, code = ended[name]
        lines = stderr.strip().splitlines()
        assert code == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("docpipe: "), (name, lines)
        assert not (tmp_path / "out" / "documents").exists(), name  # nothing was processed
        assert not (tmp_path / "out" / "runs").exists(), name  # no run was even recorded


# ---- stalls past the lease's TTL, another PID namespace, changed sources ---------------------
# A run is made to stop itself (SIGSTOP) at a named point of the commit protocol
# (DOCPIPE_FAULT_POINT, see pipeline.dataset.fault_point), after writing a marker file the
# test polls; a second run takes the output over once the short TTL has lapsed; then the
# first is woken (SIGCONT). Nothing it does afterwards may become visible or remove data.

TTL = "3"


def _stalled(point: str, src: Path, out: Path | str, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    marker = tmp_path / f"stalled-{point}"
    env = {**os.environ, "DOCPIPE_LEASE_TTL_S": TTL, "DOCPIPE_FAULT_POINT": point,
           "DOCPIPE_FAULT_MARKER": str(marker)}
    proc = subprocess.Popen([DOCPIPE, *run_args(src, out, *extra)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), f"run never reached {point} (exit {proc.poll()})"
    while _state(proc.pid) != "T" and time.monotonic() < deadline:  # the marker is written just before the stop
        time.sleep(0.01)
    assert _state(proc.pid) == "T"
    return proc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _takeover(src: Path, out: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCPIPE_LEASE_TTL_S": TTL}
    return subprocess.run([DOCPIPE, *run_args(src, out, "--wait-for-output-s", "60", *extra)], capture_output=True,
                          text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def _wake(proc: subprocess.Popen[str]) -> tuple[int, str]:
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture()
def small_corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    src = tmp_path / "in"
    return src, make_corpus(src, 10)


def test_a_run_stalled_at_its_commit_past_the_ttl_commits_nothing_after_the_takeover(small_corpus, tmp_path: Path):
    src, expected = small_corpus
    out = tmp_path / "out"
    stalled = _stalled("before_commit", src, out, tmp_path, "--shard-size", "2")
    try:
        taker = _takeover(src, out, "--shard-size", "3")
        assert taker.returncode == 0, taker.stderr
        assert "took over the output" in taker.stderr
        assert_exactly_once(out, expected)  # before the stalled run wakes
    finally:
        code, err = _wake(stalled)
    assert code == 1 and "fenced off by a newer run" in err and "Traceback" not in err, err
    assert_exactly_once(out, expected)  # it wrote nothing visible and removed nothing
    again = docpipe(*run_args(src, out, "--shard-size", "2"))
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, expected)
    assert {r["status"] for r in read_rows(str(out), "runs")} <= {"completed", "failed", "interrupted"}


def test_a_late_plan_of_a_run_that_lost_the_output_is_not_replayed_twice(small_corpus, tmp_path: Path):
    src, expected = small_corpus
    out = tmp_path / "out"
    stalled = _stalled("before_plan", src, out, tmp_path, "--shard-size", "2")
    try:
        taker = _takeover(src, out, "--shard-size", "3")  # cuts the shards differently
        assert taker.returncode == 0, taker.stderr
    finally:
        code, err = _wake(stalled)
    assert code == 1 and "Traceback" not in err, err
    assert list((out / "_docpipe" / "plans").glob("*.json")), "the late plan was written"
    again = docpipe(*run_args(src, out, "--shard-size", "3"))  # a plain rerun finds the late plan
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, expected)


def test_a_run_in_another_pid_namespace_does_not_take_a_live_output_over(small_corpus, tmp_path: Path):
    src, _expected = small_corpus
    out = tmp_path / "out"
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs root here")
    stalled = _stalled("before_commit", src, out, tmp_path, "--shard-size", "2")
    try:
        # Its pid means nothing there: it cannot tell that the owner is alive, so the TTL decides.
        other = subprocess.run(["unshare", "--pid", "--fork", DOCPIPE, *run_args(src, out)], capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert other.returncode == 3, other.stderr
        assert "in use by run" in other.stderr
    finally:
        code, err = _wake(stalled)
    assert code == 0, err  # not stalled past its TTL: it finished and keeps its output


def test_files_rewritten_deleted_and_added_between_runs_latest_wins(tmp_path: Path):
    from tests.prefect_support import make_pdf

    src = tmp_path / "in"
    expected = make_corpus(src, 6)
    out = tmp_path / "out"
    assert docpipe(*run_args(src, out, "--shard-size", "2")).returncode == 0
    old = {Path(d["source_uri"]).name: d["doc_id"] for d in read_rows(str(out), "documents")}
    make_pdf(src / "doc-001.pdf", 3, "Document 1, second edition")  # rewritten: 3 pages now
    (src / "doc-002.pdf").unlink()  # deleted: keeps its rows
    make_corpus(src, 1, start=6)  # added
    expected.update({"doc-001.pdf": 3, "doc-006.pdf": 1})
    assert docpipe(*run_args(src, out, "--shard-size", "2")).returncode == 0
    assert_exactly_once(out, expected)
    docs = {Path(d["source_uri"]).name: d for d in read_rows(str(out), "documents")}
    assert docs["doc-001.pdf"]["replaces_doc_id"] == old["doc-001.pdf"] != docs["doc-001.pdf"]["doc_id"]
    assert docs["doc-002.pdf"]["doc_id"] == old["doc-002.pdf"]
    assert docpipe("verify", str(out)).returncode == 0


def test_a_file_rewritten_after_discovery_is_processed_as_it_is_now(tmp_path: Path):
    from tests.prefect_support import make_pdf

    src = tmp_path / "in"
    expected = make_corpus(src, 4)
    out = tmp_path / "out"
    stalled = _stalled("after_discover", src, out, tmp_path, "--shard-size", "2")
    make_pdf(src / "doc-000.pdf", 2, "Document 0, rewritten while the run was planning")
    expected["doc-000.pdf"] = 2
    code, err = _wake(stalled)
    assert code == 0, err
    import hashlib

    docs = {Path(d["source_uri"]).name: d for d in read_rows(str(out), "documents")}
    assert docs["doc-000.pdf"]["doc_id"] == hashlib.sha256((src / "doc-000.pdf").read_bytes()).hexdigest()
    assert_exactly_once(out, expected)
    again = docpipe(*run_args(src, out, "--shard-size", "2"))
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, expected)


def test_a_run_stalled_at_its_commit_on_s3_leaves_the_output_exact_after_a_rerun(
    tmp_path: Path, s3_bucket: str, s3_storage_options: dict
):
    src = tmp_path / "in"
    expected = make_corpus(src, 6)  # few: every object goes through moto
    out = f"s3://{s3_bucket}/stall-out"
    options = ["--storage-options", json.dumps(s3_storage_options)]
    stalled = _stalled("before_commit", src, out, tmp_path, "--shard-size", "2", *options)
    try:
        taker = _takeover(src, out, "--shard-size", "3", *options)
        assert taker.returncode == 0, taker.stderr
    finally:
        code, err = _wake(stalled)
    assert code == 1 and "Traceback" not in err, err
    again = docpipe(*run_args(src, out, *options))
    assert again.returncode == 0, again.stderr
    pages = read_rows(out, "pages", s3_storage_options)
    docs = read_rows(out, "documents", s3_storage_options)
    assert max(page_key_counts(pages).values()) == 1
    assert pages_by_name(pages) == expected_pages(expected)
    assert sorted(Path(d["source_uri"]).name for d in docs) == sorted(expected)
    assert docpipe("verify", out, *options).returncode == 0


def test_docpipe_verify_finds_damage_repairs_it_and_the_rerun_redoes_what_was_moved_aside(tmp_path: Path):
    src = tmp_path / "in"
    expected = make_corpus(src, 6)
    out = tmp_path / "out"
    assert docpipe(*run_args(src, out, "--shard-size", "2")).returncode == 0
    assert docpipe("verify", str(out)).returncode == 0
    first, second = sorted((out / "pages").glob("part-*.parquet"))[:2]
    first.write_bytes(b"\0" * first.stat().st_size)  # zeroed
    second.unlink()  # its documents file kept
    (run_file,) = (out / "runs").glob("part-*.parquet")
    run_file.write_bytes(run_file.read_bytes()[:40])  # truncated
    found = docpipe("verify", str(out))
    assert found.returncode == 1 and "Traceback" not in found.stderr
    assert {line.split(":")[0] for line in found.stdout.splitlines()} == {
        "pages_unreadable", "pages_missing", "runs_unreadable"}
    repaired = docpipe("verify", str(out), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert len(list((out / "_docpipe" / "quarantine").rglob("*.parquet"))) == 4  # moved aside, not deleted
    assert docpipe("verify", str(out)).returncode == 0
    again = docpipe(*run_args(src, out, "--shard-size", "2"))
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    pages = read_rows(str(out), "pages")
    assert max(page_key_counts(pages).values()) == 1 and pages_by_name(pages) == expected_pages(expected)
    assert sorted(Path(d["source_uri"]).name for d in read_rows(str(out), "documents")) == sorted(expected)


def test_a_failure_reaching_the_cli_is_one_line_and_the_traceback_only_with_v(tmp_path: Path):
    src = tmp_path / "in"
    make_corpus(src, 2)
    out = tmp_path / "out"
    assert docpipe(*run_args(src, out)).returncode == 0
    (doc,) = (out / "documents").glob("part-*.parquet")
    doc.write_bytes(b"garbage")  # a damaged output that `report` reads as it is (no repair)
    plain = docpipe("report", str(out), "--html", str(tmp_path / "r.html"))
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and plain.stderr.startswith("docpipe: ")
    verbose = docpipe("-v", "report", str(out), "--html", str(tmp_path / "r.html"))
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
