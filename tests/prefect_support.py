"""Helpers for the Prefect tests: a real server on loopback, workers, deployments, documents.

Everything started here runs in its own session (process group) with PREFECT_HOME in a
temporary folder, binds to 127.0.0.1 only, and is stopped by the code that started it
(`ManagedProcess.stop`, `PrefectStack.close`), in `finally` blocks.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
SERVER_STARTUP_TIMEOUT_S = 120.0

# Prefect settings that would point a child process at another server or profile.
_SCRUB = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a Prefect process: isolated home, no analytics, fast polling."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="2",
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # `serve` (a Runner) polls as often as a worker here
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_CLI_COLORS="false",
        PYTHONUNBUFFERED="1",
        DOCPIPE_HOME=str(REPO),
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


@dataclass
class ManagedProcess:
    """A process we started in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group we created, then SIGKILL what is left."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.pid, signal.SIGKILL)  # stragglers in our group (children)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, not a shutdown)."""
        _signal_group(self.pid, signal.SIGKILL)
        self.popen.wait(10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_process(name: str, args: list[str], env: Mapping[str, str], log_dir: Path,
                  cwd: Path = REPO) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(args, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return ManagedProcess(name, popen, log_path)


def wait_for_health(api_url: str, proc: ManagedProcess | None = None,
                    timeout_s: float = SERVER_STARTUP_TIMEOUT_S) -> float:
    """Poll GET /health until the server answers; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"Prefect server at {api_url} not healthy after {timeout_s:.0f} s")


def run_cli(args: list[str], env: Mapping[str, str], timeout_s: float = 240.0,
            cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure raise with its output."""
    proc = subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@dataclass
class PrefectStack:
    """A Prefect server on 127.0.0.1 plus the workers started against it."""

    home: Path
    log_dir: Path
    server: ManagedProcess | None = None
    api_url: str = ""
    startup_s: float = 0.0
    workers: list[ManagedProcess] = field(default_factory=list)

    def start_server(self) -> PrefectStack:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = prefect_env(self.home)
        t0 = time.monotonic()
        self.server = start_process(
            "server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
                       "--analytics-off", "--log-level", "WARNING"], env, self.log_dir)
        wait_for_health(self.api_url, self.server)
        self.startup_s = time.monotonic() - t0
        return self

    def share(self, log_dir: Path) -> PrefectStack:
        """A view of this stack's server for one test module: the same server and home, its
        own workers (stopped by its `close`, which leaves the server running)."""
        return PrefectStack(home=self.home, log_dir=log_dir, api_url=self.api_url, startup_s=self.startup_s)

    def env(self, **extra: str) -> dict[str, str]:
        return prefect_env(self.home, self.api_url, **extra)

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A synchronous Prefect client talking to this server."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def cli(self, *args: str, timeout_s: float = 240.0, check: bool = True, **extra_env: str
            ) -> subprocess.CompletedProcess[str]:
        return run_cli([PREFECT, *args], self.env(**extra_env), timeout_s=timeout_s, check=check)

    def create_pool(self, pool: str) -> None:
        self.cli("work-pool", "create", pool, "--type", "process", "--overwrite")

    def deploy_all(self, *, timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
        """`prefect --no-prompt deploy --all` from the repository root (prefect.yaml).

        DOCPIPE_HOME is left unset here, so the pull step keeps its placeholder and each
        worker resolves it from its own environment (a set value would be baked in).
        """
        env = self.env()
        env.pop("DOCPIPE_HOME", None)
        return run_cli([PREFECT, "--no-prompt", "deploy", "--all"], env, timeout_s=timeout_s)

    def start_worker(self, pool: str, queue: str, name: str, *, limit: int | None = 1, **extra_env: str
                     ) -> ManagedProcess:
        args = [PREFECT, "worker", "start", "--pool", pool, "--work-queue", queue, "--name", name,
                "--type", "process", "--install-policy", "never"]
        if limit is not None:
            args += ["--limit", str(limit)]
        worker = start_process(name, args, self.env(**extra_env), self.log_dir)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None


_SUBMIT_RE = re.compile(r"[Ss]ubmitting flow run '([0-9a-f-]{36})'")


def flow_runs_taken(worker: ManagedProcess) -> set[str]:
    """Ids of the flow runs a worker says it submitted (from its log)."""
    return set(_SUBMIT_RE.findall(worker.log()))


# ---------------------------------------------------------------------------------------
# Documents and output
# ---------------------------------------------------------------------------------------

from tests.docs_factory import make_pdf  # noqa: E402 - re-exported: the tests' one make_pdf


def make_png(path: Path, label: str) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(img).text((40, 40), label, fill="black")
    img.save(path)
    return path


def make_corpus(folder: Path, count: int, *, start: int = 0, pages: Iterable[int] = (1, 2, 3)) -> dict[str, int]:
    """`count` small distinct PDFs (1-3 pages, cycling) under folder; returns name -> pages."""
    cycle = list(pages)
    expected = {}
    for i in range(start, start + count):
        n = cycle[i % len(cycle)]
        name = f"doc-{i:03d}.pdf"
        make_pdf(folder / name, n, f"Document {i}")
        expected[name] = n
    return expected


def write_bytes_s3(folder: Path, bucket_prefix: str, storage_options: dict[str, Any]) -> None:
    """Upload every file under folder to s3://bucket_prefix/ (moto)."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{bucket_prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    fs.invalidate_cache()


def read_rows(output: str, table: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rows of one output table (every part file), as dicts; [] when there is none."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    fs.invalidate_cache()
    pattern = f"{root.rstrip('/')}/{table}/part-*.parquet"
    rows: list[dict[str, Any]] = []
    for path in sorted(fs.glob(pattern)):
        with fs.open(path, "rb") as fh:
            rows.extend(pq.read_table(fh).to_pylist())
    return rows


def stray_files(output_dir: Path) -> list[str]:
    """Files under a local output that are neither final part files, hidden temporaries,
    lease records (`_docpipe/lease/<generation>.json`) nor run reports
    (`_docpipe/reports/<run>.html`). A shard plan left behind is stray: a finished run
    removes each plan once its shard is committed."""
    out = []
    for path in output_dir.rglob("*"):
        rel = path.relative_to(output_dir).as_posix()
        if not path.is_file() or path.name.startswith("."):
            continue
        if re.fullmatch(r"(pages|documents|runs)/part-[^/]+\.parquet", rel) or re.fullmatch(
            r"_docpipe/(lease/\d{12}\.json|reports/[^/]+\.html)", rel
        ):
            continue
        out.append(rel)
    return out


def page_key_counts(pages: list[dict[str, Any]]) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((p["doc_id"], p["page_number"]) for p in pages)


def pages_by_name(pages: list[dict[str, Any]]) -> dict[str, list[int]]:
    """file name -> sorted page numbers found (duplicates kept, so they show)."""
    found: dict[str, list[int]] = {}
    for p in pages:
        found.setdefault(p["source_uri"].rsplit("/", 1)[-1], []).append(p["page_number"])
    return {k: sorted(v) for k, v in found.items()}


def expected_pages(expected: Mapping[str, int]) -> dict[str, list[int]]:
    return {name: list(range(1, n + 1)) for name, n in expected.items()}

