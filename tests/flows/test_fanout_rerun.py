"""A fan-out parent that dies with its children still queued, then is run again.

The reported fault: the rerun re-sharded the remaining documents under new shard ids while
the old children were still queued, so the same pages could be written twice. Now the
rerun takes over the output's lease (the dead parent's lapses at once on its host),
replays the dead parent's plans under their own shard ids, and the old children, once a
worker takes them, find a newer lease and commit nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

from tests.prefect_support import (
    PrefectStack,
    expected_pages,
    make_corpus,
    page_key_counts,
    pages_by_name,
    read_rows,
    stray_files,
)

pytestmark = pytest.mark.slow

POOL = "docpipe"


_EARLIER: set[str] = set()  # runs of other modules on the shared server, left out of the counts


def _runs(stack: PrefectStack, deployment: str) -> list:
    with stack.client() as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])), limit=200
        )
    return [r for r in runs if str(r.id) not in _EARLIER]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _trigger(stack: PrefectStack, src: Path, out: Path) -> str:
    proc = stack.cli("deployment", "run", "docpipe-fanout/fanout", "--param", f"source={json.dumps(str(src))}",
                     "--param", f"output={json.dumps(str(out))}", "--param", "shard_size=2")
    return proc.stdout


def test_a_rerun_of_a_dead_fanout_parent_replays_its_plans_and_old_children_write_nothing(
    deployed_server: PrefectStack, tmp_path: Path
):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 4)  # 2 shards: every child run costs a process start
    stack = deployed_server.share(tmp_path / "logs")  # pool and deployments made once
    _EARLIER.update(str(r.id) for name in ("fanout", "process-shard") for r in _runs(stack, name))
    try:
        stack.start_worker(POOL, "control", "control", limit=None)  # no gpu worker yet: children stay queued

        _trigger(stack, src, out)
        _wait(lambda: len(_runs(stack, "process-shard")) == 2, 240, "the first parent's 2 children")
        (parent,) = _runs(stack, "fanout")
        pid = int(str(_wait(lambda: _runs(stack, "fanout")[0].infrastructure_pid, 60, "parent pid")).rsplit(":", 1)[-1])
        os.kill(pid, signal.SIGKILL)  # the parent dies; its children are still queued
        plans = sorted(p.stem for p in (out / "_docpipe" / "plans").glob("*.json"))
        assert len(plans) == 2

        _trigger(stack, src, out)  # the rerun
        _wait(lambda: len(_runs(stack, "process-shard")) == 4, 240, "the rerun's 2 children")
        shard_ids = {json.loads(json.dumps(r.parameters["shard"]))["shard_id"] for r in _runs(stack, "process-shard")}
        assert sorted(shard_ids) == plans  # the same shards, not a new cut

        stack.start_worker(POOL, "gpu", "gpu-0")
        def finished():
            runs = _runs(stack, "fanout")
            new = [r for r in runs if r.id != parent.id]
            return new and new[0].state and new[0].state.is_final() and new[0]
        rerun = _wait(finished, 420, "the rerun to finish")
        assert rerun.state.is_completed(), rerun.state.message
        _wait(lambda: all(r.state and r.state.is_final() for r in _runs(stack, "process-shard")), 240,
              "every child to finish")
    finally:
        stack.close()

    pages = read_rows(str(out), "pages")
    assert max(page_key_counts(pages).values()) == 1
    assert pages_by_name(pages) == expected_pages(expected)
    assert sorted(Path(d["source_uri"]).name for d in read_rows(str(out), "documents")) == sorted(expected)
    assert {d["run_id"] for d in read_rows(str(out), "documents")} == {str(rerun.id)}
    assert stray_files(out) == []  # every plan was removed with its commit
