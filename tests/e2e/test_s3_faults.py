"""Exactly once when the S3 API fails on the network: a fault-injecting proxy on 127.0.0.1
(`pipeline.testing.s3_faults`) between s3fs and the session's moto server.

The case that matters: S3 carries out a conditional PUT (`If-None-Match: *`) and answers 500
or drops the connection; botocore retries, S3 answers 412, s3fs raises FileExistsError. The
commit and the lease must recognise the object as their own write (a nonce), never take it
for another run's, and a run must never end `completed` (exit 0) over a page it lost.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import s3fs

from pipeline.dataset import Dataset
from pipeline.testing.s3_faults import FaultPlan, FaultProxy
from tests.prefect_support import BIN, expected_pages, make_corpus, pages_by_name, read_rows
from tests.test_sink import _shard_tables


@pytest.fixture()
def proxy(s3_endpoint: str):
    with FaultProxy(s3_endpoint) as running:
        yield running


def _through(proxy: FaultProxy, options: dict) -> dict:
    return {**options, "endpoint_url": proxy.url}


def test_the_proxy_lets_s3_write_and_then_answers_a_failure(proxy, s3_bucket: str, s3_storage_options: dict):
    proxy.set_plan(FaultPlan(conditional_after=1.0, kinds=("500",)))
    fs = s3fs.S3FileSystem(**_through(proxy, s3_storage_options))
    with pytest.raises(FileExistsError):  # the failure mode itself: 500, retried, 412 for its own write
        fs.pipe_file(f"{s3_bucket}/k", b"mine", mode="create")
    assert s3fs.S3FileSystem(**s3_storage_options).cat_file(f"{s3_bucket}/k") == b"mine"
    assert proxy.injected == {"after 500": 1}


@pytest.mark.parametrize("kind", ["500", "drop"])
def test_a_lease_record_the_store_answered_as_failed_is_this_runs(proxy, s3_bucket: str, s3_storage_options: dict,
                                                                   kind: str):
    proxy.set_plan(FaultPlan(conditional_after=1.0, kinds=(kind,)))
    data = Dataset(f"s3://{s3_bucket}/out", _through(proxy, s3_storage_options))
    lease = data.acquire("run-a")  # was: OutputBusy "in use by run run-a" (its own record)
    assert lease.generation == 1 and proxy.injected == {f"after {kind}": 1}
    lease.release()
    assert Dataset(f"s3://{s3_bucket}/out", s3_storage_options).acquire("run-b").generation == 2


@pytest.mark.parametrize("kind", ["500", "drop"])
def test_a_commit_the_store_answered_as_failed_is_this_runs(proxy, s3_bucket: str, s3_storage_options: dict,
                                                             kind: str):
    url = f"s3://{s3_bucket}/out"
    data = Dataset(url, _through(proxy, s3_storage_options))
    lease = data.acquire("run-a")
    proxy.set_plan(FaultPlan(conditional_after=1.0, kinds=(kind,)))  # the documents file's PUT
    assert data.commit_shard("s1", *_shard_tables("s1", ["a", "b"]), lease=lease)
    assert proxy.injected == {f"after {kind}": 1}
    lease.release()
    direct = Dataset(url, s3_storage_options)
    assert len(direct.open_table("pages").to_table()) == 4  # was: 0 (its own staged pages deleted)
    assert direct.verify() == [] and direct.check_commits(["s1"]) == []


def test_staged_pages_are_dropped_only_when_another_generation_owns_the_commit(s3_bucket: str,
                                                                               s3_storage_options: dict,
                                                                               monkeypatch):
    url = f"s3://{s3_bucket}/out"
    data = Dataset(url, s3_storage_options)
    first = data.acquire("run-a")
    data.commit_shard("s1", *_shard_tables("s1", ["a"]), lease=first)
    first.release()
    second = data.acquire("run-b")
    monkeypatch.setattr(data, "shard_done", lambda shard_id: False)  # it was committed after the check
    stage = f"{s3_bucket}/out/_docpipe/staging/g{second.generation:012d}/pages"
    assert not data.commit_shard("s1", *_shard_tables("s1", ["a", "b"]), lease=second)
    assert not data.fs.exists(f"{stage}/part-s1.parquet")  # generation 1 owns it: this copy goes
    data.commit_shard("s2", *_shard_tables("s2", ["c"]), lease=second)
    assert not data.commit_shard("s2", *_shard_tables("s2", ["d"]), lease=second)
    data.fs.invalidate_cache()
    assert data.fs.exists(f"{stage}/part-s2.parquet")  # the same generation's: no proof, left alone
    second.release()
    pages = Dataset(url, s3_storage_options).open_table("pages").to_table().to_pylist()
    assert sorted((p["shard_id"], p["source_uri"].rsplit("/", 1)[-1]) for p in pages) == [
        ("s1", "a"), ("s1", "a"), ("s2", "c"), ("s2", "c")]


def test_a_run_never_ends_completed_over_a_missing_page(tmp_path: Path, monkeypatch, capsys):
    """The end-of-run check: a store that lost a pages file after the commit (simulated) makes
    the run fail in one line (exit 1, runs row `failed`) instead of claiming success."""
    from pipeline import cli
    from pipeline.dataset.commit import _CommitOps

    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, 4)
    real = _CommitOps._publish_pages
    lost: list[str] = []

    def lossy(self, shard_id, generation=None, stage=None):
        done = real(self, shard_id, generation, stage)
        if not lost:
            lost.append(shard_id)
            self.remove(self.shard_path("pages", shard_id))
        return done

    monkeypatch.setattr(_CommitOps, "_publish_pages", lossy)
    code = cli.main(["run", str(src), "--output", str(out), "--no-progress", "--shard-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert f"shard {lost[0]}: no pages file" in err[0] and "run the same command again" in err[0]
    (run,) = read_rows(str(out), "runs")
    assert run["status"] == "failed" and "not whole" in run["message"]
    monkeypatch.undo()
    assert cli.main(["run", str(src), "--output", str(out), "--no-progress", "--shard-size", "2"]) == 0


@pytest.mark.slow
def test_docpipe_run_through_lost_replies_is_exact(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                    s3_storage_options: dict):
    """`docpipe run` to S3 while half of the first conditional PUTs are answered 500 or dropped
    after S3 carried them out (the lease's and every documents file's): exit 0 and exact."""
    src = tmp_path / "in"
    expected = make_corpus(src, 12)
    output = f"s3://{s3_bucket}/out"
    with FaultProxy(s3_endpoint, FaultPlan(seed=3, conditional_after=0.5, kinds=("500", "drop"))) as proxy:
        result = subprocess.run(
            [str(BIN / "docpipe"), "run", str(src), "--output", output, "--no-progress", "--shard-size", "2",
             "--storage-options", json.dumps(_through(proxy, s3_storage_options))],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        injected = sum(proxy.injected.values())
    assert result.returncode == 0, result.stderr  # was: exit 3 (its own lease) or exit 0 with pages lost
    assert injected >= 2, "the faults were not met"
    assert "Traceback" not in result.stderr
    assert pages_by_name(read_rows(output, "pages", s3_storage_options)) == expected_pages(expected)
    assert len(read_rows(output, "documents", s3_storage_options)) == len(expected)
    (run,) = read_rows(output, "runs", s3_storage_options)
    assert run["status"] == "completed"
