"""End to end as a user runs it: server, process pool, worker, `prefect deploy` from prefect.yaml,
`prefect deployment run 'docpipe-ingest/ingest' --param ... --watch` on a folder and on a
bucket (moto), and `docpipe serve` (flow.serve) on one machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from tests.prefect_support import (
    BIN,
    PrefectStack,
    expected_pages,
    make_corpus,
    make_png,
    page_key_counts,
    pages_by_name,
    read_rows,
    start_process,
    write_bytes_s3,
)

pytestmark = pytest.mark.slow

POOL = "docpipe"


@pytest.fixture(scope="module")
def stack(deployed_server: PrefectStack, tmp_path_factory: pytest.TempPathFactory):
    stack = deployed_server.share(tmp_path_factory.mktemp("prefect-e2e"))  # pool and deployments made once
    try:
        stack.start_worker(POOL, "gpu", "gpu-0")
        yield stack
    finally:
        stack.close()


def _corpus(folder: Path) -> dict[str, int]:
    expected = make_corpus(folder, 4)
    make_png(folder / "scans" / "receipt.png", "receipt")
    expected["receipt.png"] = 1
    return expected


def test_deploy_from_prefect_yaml_creates_the_three_deployments(stack: PrefectStack):
    queues = {}
    with stack.client() as client:
        for name in ("docpipe-ingest/ingest", "docpipe-fanout/fanout", "docpipe-process-shard/process-shard"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == POOL
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DOCPIPE_HOME }}"}}
            ]
            queues[name] = deployment.work_queue_name
        ingest = client.read_deployment_by_name("docpipe-ingest/ingest")
    assert queues == {"docpipe-ingest/ingest": "gpu", "docpipe-fanout/fanout": "control",
                      "docpipe-process-shard/process-shard": "gpu"}
    assert ingest.parameter_openapi_schema["required"] == ["source", "output"]
    assert ingest.enforce_parameter_schema


def test_deployment_run_on_a_folder(stack: PrefectStack, tmp_path: Path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _corpus(src)
    result = stack.cli("deployment", "run", "docpipe-ingest/ingest", "--param", f"source={src}",
                       "--param", f"output={out}", "--param", "shard_size=2", "--watch", "--watch-timeout", "300",
                       timeout_s=360)
    assert "Completed" in result.stdout, result.stdout[-3000:]
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)
    assert max(page_key_counts(pages).values()) == 1
    assert {d["status"] for d in read_rows(str(out), "documents")} == {"ok"}


def test_deployment_run_on_a_bucket(stack: PrefectStack, tmp_path: Path, s3_bucket: str, s3_endpoint: str,
                                    s3_storage_options: dict):
    # Credentials reach the worker through its environment (AWS_* set by conftest), not parameters.
    expected = _corpus(tmp_path / "in")
    write_bytes_s3(tmp_path / "in", f"{s3_bucket}/incoming", s3_storage_options)
    output = f"s3://{s3_bucket}/docpipe"
    result = stack.cli("deployment", "run", "docpipe-ingest/ingest", "--param", f"source=s3://{s3_bucket}/incoming",
                       "--param", f"output={output}", "--param",
                       f"storage_options={json.dumps({'endpoint_url': s3_endpoint})}",
                       "--watch", "--watch-timeout", "300", timeout_s=360)
    assert "Completed" in result.stdout, result.stdout[-3000:]
    pages = read_rows(output, "pages", s3_storage_options)
    assert pages_by_name(pages) == expected_pages(expected)
    assert all(p["source_uri"].startswith(f"s3://{s3_bucket}/incoming/") for p in pages)


def test_invalid_parameters_are_rejected_before_any_run(stack: PrefectStack, tmp_path: Path):
    result = stack.cli("deployment", "run", "docpipe-ingest/ingest", "--param", f"source={tmp_path}",
                       "--param", f"output={tmp_path / 'out'}", "--param", "shard_size=0", check=False)
    assert result.returncode != 0
    assert "shard_size" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def _wait_for_deployment(stack: PrefectStack, name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.client() as client:
        while time.monotonic() < deadline:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                time.sleep(0.5)
    raise TimeoutError(f"deployment {name} did not appear")


def test_serve_runs_the_ingest_flow_from_one_process(stack: PrefectStack, tmp_path: Path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _corpus(src)
    served = start_process("serve", [sys.executable, "-c", "from flows.deploy import serve; serve(name='served')"],
                           stack.env(), stack.log_dir, cwd=tmp_path)  # not the repo root: module entrypoint
    try:
        _wait_for_deployment(stack, "docpipe-ingest/served")
        result = stack.cli("deployment", "run", "docpipe-ingest/served", "--param", f"source={src}",
                           "--param", f"output={out}", "--watch", "--watch-timeout", "300", timeout_s=360)
        assert "Completed" in result.stdout, result.stdout[-3000:] + served.log()[-3000:]
    finally:
        served.stop()
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether `sig` waits for the (stopped) process `pid` (/proc/<pid>/status ShdPnd / SigPnd)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(mask & (1 << (sig - 1)) for mask in masks)


def test_cancelling_a_deployments_flow_run_releases_the_output(stack: PrefectStack, tmp_path: Path):
    """Cancel a flow run of the ingest deployment while it works (the process worker sends
    SIGTERM): the lease is released, the runs row is `interrupted`, and the next run starts at
    at once (another PID namespace would do: the lease says released). The flow run stops itself at its commit point (DOCPIPE_FAULT_POINT, via the run's
    job variables) so the cancellation lands mid-shard, whatever the machine's speed."""
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 6)
    marker = tmp_path / "marker"
    env = {"DOCPIPE_FAULT_POINT": "before_commit", "DOCPIPE_FAULT_MARKER": str(marker)}
    with stack.client() as client:
        deployment = client.read_deployment_by_name("docpipe-ingest/ingest")
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"source": str(src), "output": str(out), "shard_size": 2},
            job_variables={"env": env})
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the flow run never reached its commit point"
    pid = int(marker.read_text().split()[1])
    with stack.client() as client:
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        while not _signal_pending(pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _signal_pending(pid, signal.SIGTERM), "the worker never sent SIGTERM"
        os.kill(pid, signal.SIGCONT)
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run.id).state
            if state is not None and state.is_final():
                break
            time.sleep(0.5)
    assert state is not None and state.is_cancelled(), state
    leases = sorted((out / "_docpipe" / "lease").glob("*.json"))
    assert json.loads(leases[-1].read_text())["released"] is True
    (run,) = read_rows(str(out), "runs")
    assert run["status"] == "interrupted", run  # was: failed (Prefect's TerminationSignal)
    again = subprocess.run([str(BIN / "docpipe"), "run", str(src), "--output", str(out), "--no-progress",
                            "--shard-size", "2"], capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected) and max(page_key_counts(pages).values()) == 1
