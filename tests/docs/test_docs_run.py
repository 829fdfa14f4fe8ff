"""The docs run as written: every command block of README.md and docs/*.md, in order, on a
fresh output.

Rules (one place, so a reader of a failure knows what ran):

- A fenced block runs when its language is `bash` (a bash session per document: the
  working directory and exported variables carry from one block to the next), `python`
  (python in that directory) or `sql` starting with `-- duckdb` (each statement through
  DuckDB). Other fences (plain text, diagrams) are not commands.
- The line just above a block may say how to treat it:
  `<!-- docs-test: skip: REASON -->` leaves it out; each such block is reported as a
  skipped test with its reason (GPU, hub downloads, real buckets, the set-up commands
  themselves...), so what is not run is listed on every run of the suite.
  `<!-- docs-test: background -->` starts each of its commands in the background (servers,
  workers), stopped at the end of the document; `<!-- docs-test: background; ready when URL
  answers -->` also waits until URL answers before the next block.
- Each document runs in a fresh copy of the repository (its tracked files), with its own
  Prefect home, no AWS credentials but the ones the document exports, no model hub, and
  two rewrites so that runs never share state: `/tmp/` paths go into the test's own
  folder, and the fixed ports 4200 (Prefect) and 5000 (moto) become free ports.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
BLOCK_TIMEOUT_S = 420


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str  # bash | python | sql
    text: str
    skip: str | None = None  # the reason it is not run
    background: bool = False
    ready_url: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks_of(doc: str) -> list[Block]:
    """The command blocks of one document, in order, with their markers."""
    text = (ROOT / doc).read_text()
    out = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1).lower(), match.group(2)
        if lang == "sql" and not body.lstrip().startswith("-- duckdb"):
            continue
        if lang not in ("bash", "python", "sql"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        skip = background = None
        ready = None
        if marker:
            spec = marker.group(1)
            if spec.startswith("skip:"):
                skip = spec[len("skip:"):].strip()
                assert skip, f"{doc}:{line}: a skipped block must say why"
            elif spec.startswith("background"):
                background = True
                found = re.search(r"ready when (\S+) answers", spec)
                ready = found.group(1) if found else None
            else:
                raise AssertionError(f"{doc}:{line}: unknown docs-test marker {spec!r}")
        out.append(Block(doc, line, lang, body, skip, bool(background), ready))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Session:
    """One document's run: a copy of the repository, an environment file, background processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.work = tmp / "work"
        self.scratch = tmp / "scratch"
        self.scratch.mkdir()
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for rel in filter(None, files.decode().split("\0")):
            src = ROOT / rel
            if src.is_file():
                dst = self.work / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.ports = {"4200": str(_free_port()), "5000": str(_free_port())}
        self.env_file = tmp / "env.sh"
        self.env_file.write_text("")
        self.background: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "PREFECT_", "HF_", "DOCPIPE_", "PYTEST_"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(self.work),
            PREFECT_HOME=str(tmp / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            HF_HOME=str(tmp / "hf-home"),
            HF_HUB_OFFLINE="1",
            AWS_EC2_METADATA_DISABLED="true",  # no credentials but the document's own
            AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
            # workers and `serve` poll every second instead of Prefect's 10 s: the commands are as
            # written, only the wait for a scheduled run to be picked up is shorter
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="2",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
        )
        self.env = env
        self.log: list[str] = []

    def rewrite(self, text: str) -> str:
        text = text.replace("/tmp/", f"{self.scratch}/")
        for fixed, port in self.ports.items():
            text = re.sub(rf"(?<=127\.0\.0\.1:){fixed}\b|(?<=--port ){fixed}\b|(?<=-p ){fixed}\b", port, text)
        return text

    def _bash(self, script: str) -> str:
        return f"set -eo pipefail\nsource {self.env_file}\ncd {self.work}\n{script}\nexport -p > {self.env_file}\n"

    def run(self, block: Block) -> None:
        text = self.rewrite(block.text)
        self.log.append(f"--- {block.where} ({block.lang}{', background' if block.background else ''})\n{text}")
        if block.background:
            for command in _commands(text):
                log = open(self.tmp / f"bg-{len(self.background)}.log", "w")
                proc = subprocess.Popen(["bash", "-c", self._bash(command)], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                self.background.append(proc)
            if block.ready_url:
                self._wait_for(block.ready_url, block)
            return
        if block.lang == "bash":
            args = ["bash", "-c", self._bash(text)]
        elif block.lang == "python":
            args = ["bash", "-c", self._bash(f"python - <<'DOCS_PYTHON'\n{text}\nDOCS_PYTHON")]
        else:
            statements = [s.strip() for s in text.split(";") if s.strip() and not s.strip().startswith("--")]
            program = "import duckdb\n" + "".join(f"print(duckdb.sql({s!r}).fetchall())\n" for s in statements)
            args = ["bash", "-c", self._bash(f"python - <<'DOCS_PYTHON'\n{program}\nDOCS_PYTHON")]
        t0 = time.perf_counter()
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
                              start_new_session=True)
        self.log.append(f"[exit {proc.returncode} in {time.perf_counter() - t0:.1f} s]\n{proc.stdout[-3000:]}"
                        f"{proc.stderr[-3000:]}")
        if proc.returncode != 0:
            raise AssertionError(f"{block.where} failed (exit {proc.returncode}):\n" + "\n".join(self.log[-6:])
                                 + self.background_logs())

    def _wait_for(self, url: str, block: Block, timeout_s: float = 120.0) -> None:
        url = self.rewrite(url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status < 500:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{block.where}: {url} did not answer in {timeout_s:.0f} s" + self.background_logs())

    def background_logs(self) -> str:
        parts = []
        for i, _ in enumerate(self.background):
            path = self.tmp / f"bg-{i}.log"
            parts.append(f"\n--- background {i}:\n{path.read_text()[-2000:] if path.exists() else ''}")
        return "".join(parts)

    def close(self) -> None:
        """Stop every background command's whole process group: SIGTERM, up to 15 s for the group
        to be gone, then SIGKILL. The group, not only its shell: a shell that dies at once can
        leave its command (a Prefect worker) running, orphaned, after the suite."""
        for proc in self.background:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.background:
            while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
                time.sleep(0.2)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _commands(text: str) -> list[str]:
    """Command lines of a shell block (continuations joined, comments and blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
    return [line.rstrip("&").strip() for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------

ALL = [b for doc in DOCS for b in blocks_of(doc)]


@pytest.mark.parametrize("block", [b for b in ALL if b.skip], ids=lambda b: b.where)
def test_blocks_not_run_say_why(block: Block) -> None:
    pytest.skip(f"{block.where} not run: {block.skip}")


def test_every_doc_with_commands_is_covered() -> None:
    assert {b.doc for b in ALL} >= {"README.md", "docs/deployment.md"}
    assert any(b.background for b in ALL) and any(b.lang == "python" for b in ALL)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(not b.skip for b in blocks_of(d))])
def test_doc_runs_as_written(doc: str, tmp_path: Path) -> None:
    session = Session(tmp_path)
    try:
        for block in blocks_of(doc):
            if not block.skip:
                session.run(block)
    finally:
        session.close()
    print("\n".join(session.log))
