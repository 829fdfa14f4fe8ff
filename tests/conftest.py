"""Shared fixtures: a real S3 API on loopback (moto server) and isolated environments."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prefect must never read or write the developer's ~/.prefect, nor phone home, from tests:
# set before any test module imports it. Tests that start servers give each its own home.
_PREFECT_HOME = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"docpipe-tests-prefect-{os.getpid()}")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PREFECT_API_URL") == "":  # empty is not "unset" to Prefect
    del os.environ["PREFECT_API_URL"]


# Under pytest-xdist (`./dev test` runs 2 workers) each worker has its own session fixtures.
# A test file runs on one worker (its module fixtures are built once), and so do the files that
# share an expensive session fixture (built once): `pytest_xdist_make_scheduler` below schedules
# by these groups; the collection hook fails the run if a test using one sits outside its group.
_ONE_WORKER = {  # path prefix -> group
    "tests/flows/": "prefect_server",
    "tests/e2e/test_resume.py": "prefect_server",
    "tests/report/test_report.py": "sample_run",
    "tests/e2e/test_runner_model.py": "sample_run",
}


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return next((group for prefix, group in _ONE_WORKER.items() if path.startswith(prefix)), path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in set(_ONE_WORKER.values()) & set(item.fixturenames):
            if _group(item.nodeid) != fixture:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add its file to _ONE_WORKER in tests/conftest.py")


@pytest.hookimpl(optionalhook=True)  # pytest without pytest-xdist still collects this file
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # only called where pytest-xdist runs
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByGroup(config, log)


SAMPLES = Path(__file__).resolve().parents[1] / "sample_docs"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole test session (stopped at the end)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials() -> None:
    # moto accepts any credentials; s3fs needs some to sign requests. Never real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture()
def s3_storage_options(s3_endpoint: str) -> dict:
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture()
def s3_bucket(s3_endpoint: str, s3_storage_options: dict) -> str:
    """A fresh, empty bucket; returns its name."""
    import s3fs

    name = f"bkt-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(family)`: the folder of a tiny random model of `family`, built once per
    test session and shared (tests must not write into it)."""
    from pipeline.testing import make_tiny_model

    built: dict[tuple[str, int], str] = {}

    def get(family: str = "internvl", seed: int = 0) -> str:
        key = (family, seed)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            built[key] = str(make_tiny_model(family, folder, seed=seed))
        return built[key]

    return get


@pytest.fixture(scope="session")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the tests that use it (2-core CI machines run pytest and a
    prep worker beside it); restored at the end of the session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """One Prefect server on 127.0.0.1 for the whole test session (~10-16 s to start, once).

    Modules take a `share()` of it for their own workers; flows run in-process point at it
    with `temporary_settings(PREFECT_API_URL=...)`. Stopped at the end of the session.
    """
    from tests.prefect_support import PrefectStack

    base = tmp_path_factory.mktemp("prefect-session")
    stack = PrefectStack(home=base / "home", log_dir=base / "logs")
    try:
        yield stack.start_server()
    finally:
        stack.close()


@pytest.fixture(scope="session")
def deployed_server(prefect_server):
    """The session's Prefect server with the `docpipe` process work pool and prefect.yaml's
    deployments (`prefect --no-prompt deploy --all`), made once for every module that runs
    deployments; each module starts its own workers on a `share()` of it."""
    prefect_server.create_pool("docpipe")
    prefect_server.deploy_all()
    return prefect_server


@dataclass(frozen=True)
class SampleRun:
    output: Path  # read it, never write into it: other modules read the same output
    model: str  # the session's tiny InternVL
    printed: str  # what the first `docpipe run` printed (its summary)


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> SampleRun:
    """One whole run, read by several modules (the report, the model columns): `docpipe run`
    (in process) over sample_docs plus an empty file (a document error) with the session's tiny
    InternVL and 4 new tokens, then the same command again with nothing new (a nightly no-op
    rerun: the latest run holds no rows)."""
    from pipeline.cli import main
    from pipeline.dataset import Dataset

    base = tmp_path_factory.mktemp("sample-run")
    src = base / "docs"
    shutil.copytree(SAMPLES, src, ignore=shutil.ignore_patterns("*.md", "*.py"))
    (src / "empty.pdf").write_bytes(b"")
    out = base / "out"
    model = tiny_model("internvl")
    argv = ["run", str(src), "--output", str(out), "--model", model, "--device", "cpu", "--max-new-tokens", "4",
            "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    assert main(argv) == 0
    first, rerun = Dataset(str(out)).read_runs()
    assert rerun["documents_processed"] == 0  # the no-op rerun
    return SampleRun(out, model, printed.getvalue())
