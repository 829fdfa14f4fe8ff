"""SIGTERM and SIGHUP end `docpipe run` as Ctrl-C does (what Kubernetes, `docker stop`, a closed
terminal and a Prefect worker's cancellation send): one line, exit 128 + the signal's number,
the lease released, the runs row `interrupted`, the prep workers stopped; a replacement run
from another PID namespace (a new pod) starts at once and the output ends exact.

The signal is placed exactly: the run stops itself (SIGSTOP) at its commit point
(DOCPIPE_FAULT_POINT), the signal is sent while it is stopped, then SIGCONT lets it arrive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_support import make_corpus, read_rows
from tests.prep_faults import children_of, wait_gone
from tests.e2e.test_faults import DOCPIPE, _stalled, assert_exactly_once, run_args

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _sighup_at_its_default() -> Iterator[None]:
    """Runs here start as from a terminal: SIGHUP at its default. A suite started under `nohup`
    ignores SIGHUP, and docpipe rightly keeps ignoring a signal it inherits as ignored (the last
    test checks that), so without this the SIGHUP case would test nohup instead."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, before)


def _lease_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_docpipe" / "lease").glob("*.json"))]


@pytest.mark.parametrize(("sig", "to_group"), [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                               (signal.SIGHUP, False)])
def test_a_stop_signal_ends_the_run_cleanly_and_a_new_pod_takes_over_at_once(tmp_path: Path, sig: int,
                                                                            to_group: bool):
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs root here")
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 8)
    stalled = _stalled("before_commit", src, out, tmp_path, "--shard-size", "2", "--prep-workers", "2")
    try:
        workers = children_of(stalled.pid)
        assert workers, "the run had no worker processes"
        if to_group:  # `docker stop` of a shell, a process-group kill: the workers get it too
            os.killpg(stalled.pid, sig)
        else:
            os.kill(stalled.pid, sig)
        os.kill(stalled.pid, signal.SIGCONT)
        _, err = stalled.communicate(timeout=120)
    finally:
        if stalled.poll() is None:
            stalled.kill()
    name = signal.Signals(sig).name
    assert stalled.returncode == 128 + sig, err  # was: -15 / -1, killed by the signal, nothing said
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"docpipe: terminated by {name}; finished shards are kept"), err
    assert wait_gone(workers, 5.0) == []
    assert _lease_records(out)[-1]["released"] is True
    (run,) = read_rows(str(out), "runs")
    assert run["status"] == "interrupted" and run["message"] == f"terminated by {name}"
    t0 = time.monotonic()
    replacement = subprocess.run(["unshare", "--pid", "--fork", DOCPIPE, *run_args(src, out, "--shard-size", "2")],
                                 capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert replacement.returncode == 0, replacement.stderr  # was: exit 3 until the lease's TTL ran out
    assert time.monotonic() - t0 < 60
    assert_exactly_once(out, expected)


def test_a_command_started_with_sighup_ignored_keeps_ignoring_it(tmp_path: Path):
    """`nohup docpipe run ...` means: survive the terminal closing."""
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 4)
    stalled = _stalled_ignoring_sighup(src, out, tmp_path)
    try:
        os.kill(stalled.pid, signal.SIGHUP)
        os.kill(stalled.pid, signal.SIGCONT)
        _, err = stalled.communicate(timeout=120)
    finally:
        if stalled.poll() is None:
            stalled.kill()
    assert stalled.returncode == 0, err
    assert_exactly_once(out, expected)


def _stalled_ignoring_sighup(src: Path, out: Path, tmp_path: Path) -> subprocess.Popen[str]:
    marker = tmp_path / "marker-nohup"
    env = {**os.environ, "DOCPIPE_FAULT_POINT": "before_commit", "DOCPIPE_FAULT_MARKER": str(marker)}
    proc = subprocess.Popen(["nohup", DOCPIPE, *run_args(src, out, "--shard-size", "2")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.exists() and Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return proc
        time.sleep(0.02)
    raise AssertionError(f"the run never stopped at its commit (exit {proc.poll()})")
