"""A fault-injecting HTTP proxy for an S3 API on 127.0.0.1 (tests and bench/faults.py).

`FaultProxy(upstream, FaultPlan(...))` listens on 127.0.0.1 and forwards every request to
`upstream` (a moto server, say), except that, by the plan, it

- answers a request with 500 InternalError, 503 SlowDown or a dropped connection *before*
  forwarding it (the store never saw it): `before`;
- forwards it, lets the store carry it out, then throws the store's answer away and answers
  500 / 503 / a dropped connection instead (the store did it, the client is told it failed,
  which AWS documents can happen): `after`;
- does the same to the *first* conditional PUT (`If-None-Match: *`) of each key:
  `conditional_after` (a retry of that PUT is passed through, so the client then gets 412
  Precondition Failed for its own write: the case a commit must recognise as its own);
- holds a request `delay_s` seconds before forwarding it: `delay`.

Each share is a probability per request, drawn from one seeded random generator. What was
injected is counted in `proxy.injected` (kind -> count), so a test can check its faults
were really met. Point a client at `proxy.url` as its endpoint (s3fs: `endpoint_url`).

Only loopback addresses; `stop()` (or the context manager) shuts the server down.
`python -m pipeline.testing.s3_faults UPSTREAM --conditional-after 0.25` runs one by hand.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("500", "503", "drop")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_BODIES = {
    "500": b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
           b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    "503": b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
           b"<Message>Please reduce your request rate.</Message></Error>",
}


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail, and how (each share is a probability per request)."""

    seed: int = 0
    before: float = 0.0  # fail before forwarding (the store never sees it)
    after: float = 0.0  # forward, then answer a failure (the store did it)
    conditional_after: float = 0.0  # the same, for the first If-None-Match PUT of each key only
    delay: float = 0.0  # forward after a pause of delay_s
    delay_s: tuple[float, float] = (3.0, 8.0)
    kinds: tuple[str, ...] = KINDS  # failures to choose from: "500", "503", "drop"

    def __post_init__(self) -> None:
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be some of {KINDS}, got {self.kinds}")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that injects the faults of `plan`."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the upstream must be on loopback, got {upstream}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.plan = plan or FaultPlan()
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._conditional_seen: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    def set_plan(self, plan: FaultPlan) -> None:
        """Change the faults from now on (a new seed restarts the draws)."""
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the plan, per request ----------------------------------------------------------
    def decide(self, method: str, path: str, headers: Any) -> tuple[str | None, str | None, float]:
        """(failure before, failure after, delay in seconds) for one request."""
        plan = self.plan
        with self._lock:
            self.requests += 1
            rng = self._rng
            delay = rng.uniform(*plan.delay_s) if plan.delay and rng.random() < plan.delay else 0.0
            if plan.before and rng.random() < plan.before:
                return rng.choice(plan.kinds), None, delay
            if plan.after and rng.random() < plan.after:
                return None, rng.choice(plan.kinds), delay
            if method == "PUT" and headers.get("If-None-Match", "").strip() == "*":
                key = urllib.parse.urlsplit(path).path
                first = key not in self._conditional_seen
                self._conditional_seen.add(key)
                if first and plan.conditional_after and rng.random() < plan.conditional_after:
                    return None, rng.choice(plan.kinds), delay
            return None, None, delay

    def count(self, what: str) -> None:
        with self._lock:
            self.injected[what] += 1


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = bytearray()
                while True:  # relay the chunks as they are (aws-chunked signing reads them)
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the blank line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return bytes(raw)
                    raw += self.rfile.read(size + 2)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _fail(self, kind: str, when: str) -> None:
            proxy.count(f"{when} {kind}")
            if kind == "drop":  # a reset, no answer at all
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass
                return
            body = _BODIES[kind]
            self.send_response(int(kind))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> None:
            body = self._body()
            before, after, delay = proxy.decide(self.command, self.path, self.headers)
            if delay:
                proxy.count("delay")
                time.sleep(delay)
            if before:
                self._fail(before, "before")
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection", "expect")}
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body if body else None)
                response = conn.getresponse()
                data = response.read()
                status, reason, out_headers = response.status, response.reason, response.getheaders()
            finally:
                conn.close()
            if after:
                self._fail(after, "after")
                return
            self.send_response(status, reason)
            for key, value in out_headers:
                if key.lower() in _HOP or (key.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD" and data:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fault-injecting proxy for an S3 API on 127.0.0.1.")
    parser.add_argument("upstream", help="e.g. http://127.0.0.1:5000 (a moto server)")
    for name in ("before", "after", "conditional-after", "delay"):
        parser.add_argument(f"--{name}", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plan = FaultPlan(seed=args.seed, before=args.before, after=args.after, conditional_after=args.conditional_after,
                     delay=args.delay)
    with FaultProxy(args.upstream, plan) as proxy:
        print(proxy.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
