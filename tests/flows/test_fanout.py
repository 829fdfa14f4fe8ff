"""Scale-out on a real Prefect server: a process work pool, two GPU-queue workers, fan-out.

`docpipe-fanout` (on the `control` queue) submits one `docpipe-process-shard` run per
shard (on the `gpu` queue); two workers with `--limit 1` take them. Every page must land
exactly once; a child run whose process is SIGKILLed (Crashed) is re-submitted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import StateType

from tests.prefect_support import (
    PrefectStack,
    expected_pages,
    flow_runs_taken,
    make_corpus,
    page_key_counts,
    pages_by_name,
    read_rows,
)

pytestmark = pytest.mark.slow

POOL = "docpipe"
_UUID_RE = re.compile(r"UUID[^0-9a-f]*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@pytest.fixture(scope="module")
def stack(deployed_server: PrefectStack, tmp_path_factory: pytest.TempPathFactory):
    stack = deployed_server.share(tmp_path_factory.mktemp("prefect-fanout"))  # pool and deployments made once
    try:
        stack.start_worker(POOL, "control", "control", limit=None)
        stack.start_worker(POOL, "gpu", "gpu-0", CUDA_VISIBLE_DEVICES="0")
        stack.start_worker(POOL, "gpu", "gpu-1", CUDA_VISIBLE_DEVICES="1")
        yield stack
    finally:
        stack.close()


def _child_runs(stack: PrefectStack) -> list:
    with stack.client() as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["process-shard"])), limit=200
        )


def _flow_run(stack: PrefectStack, flow_run_id: UUID):
    with stack.client() as client:
        return client.read_flow_run(flow_run_id)


def _running_child(stack: PrefectStack, before: set[str]) -> tuple[UUID, int] | None:
    """(id, pid) of a new child run whose process has started and is not finished, if any."""
    for run in _child_runs(stack):
        if str(run.id) in before or run.state is None or run.state.is_final() or not run.infrastructure_pid:
            continue
        return run.id, int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
    return None


def _worker_of(stack: PrefectStack, pid: int) -> str | None:
    """Name of the worker whose process tree `pid` belongs to (walking parents in /proc)."""
    workers = {w.pid: w.name for w in stack.workers}
    for _ in range(16):
        if pid in workers:
            return workers[pid]
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state is the parent pid
        if pid <= 1:
            return None
    return None


def _wait_final(stack: PrefectStack, flow_run_id: UUID, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not (run := _flow_run(stack, flow_run_id)).state.is_final() and time.monotonic() < deadline:
        time.sleep(1)
    return run


def test_two_workers_share_the_shards_every_page_once(stack: PrefectStack, tmp_path: Path):
    """Both GPU workers take shards. Made deterministic by holding the first child run
    (SIGSTOP) until another one starts: a worker with --limit 1 cannot take a second run
    while its first is running, so the other worker must take it."""
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 8)
    before = {str(r.id) for r in _child_runs(stack)}
    started = stack.cli("deployment", "run", "docpipe-fanout/fanout", "--param", f"source={src}",
                        "--param", f"output={out}", "--param", "shard_size=2")
    parent_id = UUID(_UUID_RE.search(started.stdout).group(1))

    deadline = time.monotonic() + 240
    while (first := _running_child(stack, before)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first is not None, "no child run was seen running"
    held, pid = first
    os.kill(pid, signal.SIGSTOP)
    try:
        holder = _worker_of(stack, pid)
        deadline = time.monotonic() + 120
        while (other := _running_child(stack, before | {str(held)})) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert other is not None, "no other child run started while the first was held"
        other_worker = _worker_of(stack, other[1])
    finally:
        os.kill(pid, signal.SIGCONT)
    # Each run's process is a descendant of the worker that took it (the workers' logs do
    # not tell: every worker that tries to claim a run logs "submitting" for it).
    assert {holder, other_worker} == {"gpu-0", "gpu-1"}, (holder, other_worker)

    parent = _wait_final(stack, parent_id)
    assert parent.state.type is StateType.COMPLETED, parent.state.message
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)
    assert max(page_key_counts(pages).values()) == 1
    assert len(read_rows(str(out), "documents")) == 8

    children = [r for r in _child_runs(stack) if str(r.id) not in before]
    assert len(children) == 4 and all(r.state.type is StateType.COMPLETED for r in children)
    assert all(r.work_queue_name == "gpu" for r in children)
    taken = {w.name: flow_runs_taken(w) & {str(r.id) for r in children} for w in stack.workers}
    assert taken["control"] == set()
    assert taken["gpu-0"] | taken["gpu-1"] == {str(r.id) for r in children}
    assert str(held) in taken[holder] and str(other[0]) in taken[other_worker]


def test_crashed_child_run_is_resubmitted(stack: PrefectStack, tmp_path: Path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 6, pages=(3,))
    before = {str(r.id) for r in _child_runs(stack)}
    started = stack.cli("deployment", "run", "docpipe-fanout/fanout", "--param", f"source={src}",
                        "--param", f"output={out}", "--param", "shard_size=2")
    parent_id = UUID(_UUID_RE.search(started.stdout).group(1))

    # Kill the process of the first child run that has one, before it finishes.
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline:
        for run in _child_runs(stack):
            if str(run.id) in before or run.state is None or run.state.is_final() or not run.infrastructure_pid:
                continue
            pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            victim = run.id
            break
        time.sleep(0.2)
    assert victim is not None, "no child run was seen running"

    deadline = time.monotonic() + 300
    while not (parent := _flow_run(stack, parent_id)).state.is_final() and time.monotonic() < deadline:
        time.sleep(2)
    assert parent.state.type is StateType.COMPLETED, parent.state.message
    assert _flow_run(stack, victim).state.type is StateType.CRASHED
    children = [r for r in _child_runs(stack) if str(r.id) not in before]
    assert len(children) == 4  # 3 shards + 1 resubmission of the crashed one
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)
    assert max(page_key_counts(pages).values()) == 1
