"""Who owns the output: lease records, the owner's liveness, taking a lease, and a held lease.

A run owns the output while it holds the newest lease generation and keeps it fresh
(heartbeat); see the protocol in pipeline/dataset/__init__.py, step 1, and docs/exactly-once.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.dataset.store import META, _age_s, _join, _Store, _warn_once
from pipeline.sources import full_uri

log = logging.getLogger("pipeline.dataset")

LEASE_TTL_S = float(os.environ.get("DOCPIPE_LEASE_TTL_S", "60"))  # a lease not refreshed for this long has lapsed
HEARTBEAT_S = min(10.0, LEASE_TTL_S / 4)  # how often the owner refreshes it
_GEN_RE = re.compile(r"^(?P<gen>\d{12})\.json$")


class OutputBusy(RuntimeError):
    """Another live run owns the output."""


class LeaseLost(RuntimeError):
    """This run no longer owns the output (a newer run took it over): nothing more is committed."""


# ---------------------------------------------------------------------------------------
# The owner's process
# ---------------------------------------------------------------------------------------


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _boot_id() -> str | None:
    """This kernel's boot id (Linux); two containers on one host share it, two hosts never do."""
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    """The inode of this process's PID namespace: pids mean the same thing only within one."""
    try:
        return f"pid:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): tells a reused pid from its first owner."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # fields[0] is field 3 (state)

# ---------------------------------------------------------------------------------------
# Lease records
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One lease generation as stored in `_docpipe/lease/<generation>.json`."""

    generation: int
    run_id: str
    host: str
    pid: int
    acquired_at: float  # unix seconds
    heartbeat_at: float
    ttl_s: float
    released: bool = False
    boot_id: str | None = None  # the owner's kernel boot
    pid_ns: str | None = None  # the owner's PID namespace
    start_time: str | None = None  # the owner process's start time (clock ticks after boot)
    nonce: str | None = None  # this acquisition's own mark: tells its record from any other

    def expired(self, now: float | None = None) -> bool:
        """The record's own heartbeat is more than the TTL away from this machine's clock, in
        the past or in the future (the writer's clock cannot be checked; see `stale_reason`)."""
        now = time.time() if now is None else now
        return abs(now - self.heartbeat_at) > self.ttl_s

    def owner_gone(self) -> bool:
        """The owner's process no longer exists, as far as this process can really tell.

        Only a checker in the owner's kernel boot and PID namespace can see the owner's pid
        (a container with its own PID namespace, or another machine with the same host name,
        cannot): anywhere else, or for a record that does not say, the TTL alone decides.
        A live pid that started at another time than the owner is a reused pid: gone.
        """
        if self.host != _host() or not self.boot_id or not self.pid_ns:
            return False
        if self.boot_id != _boot_id() or self.pid_ns != _pid_namespace():
            return False
        if not _pid_alive(self.pid):
            return True
        return self.start_time is not None and _start_time(self.pid) not in (None, self.start_time)

    def lapsed(self) -> bool:
        return self.released or self.expired() or self.owner_gone()

    def heartbeat_words(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat_at
        if age < -1:
            return f"its heartbeat dated {-age:.0f} s ahead of this machine's clock"
        return f"last heartbeat {max(age, 0):.0f} s ago"

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, {self.heartbeat_words()})"


def stale_reason(info: LeaseInfo, *, unchanged_s: float, store_age_s: float | None,
                 now: float | None = None) -> str | None:
    """Why a live-looking lease record counts as stale, or None while it counts as live.

    Liveness does not trust the clock of the machine that wrote the record. A record is
    stale when it has not changed for the TTL: as watched on this machine's monotonic clock
    (`unchanged_s`, while waiting for the output), or by the store's own modification time
    against this machine's clock (`store_age_s`; None when the store gives none). The
    heartbeat inside the record only confirms: a heartbeat older than the TTL counts when
    the store's time agrees (a writer whose clock is behind keeps its record fresh in the
    store), and a heartbeat dated more than the TTL in the future is not trusted at all.
    """
    now = time.time() if now is None else now
    if unchanged_s > info.ttl_s:
        return f"its record has not changed for {unchanged_s:.0f} s, as watched on this machine's monotonic clock"
    age = now - info.heartbeat_at
    stored = "" if store_age_s is None else f", and the store last saw it written {store_age_s:.0f} s ago"
    if store_age_s is not None and store_age_s > info.ttl_s:
        if age < -info.ttl_s:
            return (f"its heartbeat is dated {-age:.0f} s in the future (the clock of the machine that wrote it "
                    f"is ahead; not trusted){stored}")
        return (f"its record has not changed for {store_age_s:.0f} s by the store's clock "
                f"(last heartbeat {age:.0f} s ago)")
    if store_age_s is None:
        if age > info.ttl_s:
            return f"its last heartbeat was {age:.0f} s ago"
        if age < -info.ttl_s:
            return (f"its heartbeat is dated {-age:.0f} s in the future (the clock of the machine that wrote it "
                    "is ahead)")
    return None


class _LeaseRecord(BaseModel):
    """The stored form of a lease, validated: anything else is a malformed (stale) lease."""

    model_config = ConfigDict(extra="ignore")
    generation: int = Field(ge=1)
    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    ttl_s: float = Field(gt=0)
    released: bool = False
    boot_id: str | None = None
    pid_ns: str | None = None
    start_time: str | None = None
    nonce: str | None = None


def _new_lease(generation: int, run_id: str, ttl_s: float) -> LeaseInfo:
    now = time.time()
    pid = os.getpid()
    return LeaseInfo(generation, run_id, _host(), pid, now, now, ttl_s, False, _boot_id(), _pid_namespace(),
                     _start_time(pid), uuid.uuid4().hex)


def _is_record_of(raw: bytes, info: LeaseInfo) -> bool:
    """Whether the stored bytes are the record of this very acquisition (same run, same nonce)."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return (isinstance(record, dict) and record.get("run_id") == info.run_id and record.get("nonce") == info.nonce
            and record.get("generation") == info.generation)


def _lease_bytes(info: LeaseInfo) -> bytes:
    return json.dumps(asdict(info), sort_keys=True).encode()


# ---------------------------------------------------------------------------------------
# Taking the lease (methods of Dataset)
# ---------------------------------------------------------------------------------------


class _LeaseOps(_Store):
    def _lease_dir(self) -> str:
        return self.path(META, "lease")

    def _lease_path(self, generation: int) -> str:
        return _join(self._lease_dir(), f"{generation:012d}.json")

    def _lease_entries(self) -> dict[int, dict[str, Any]]:
        """generation -> listing entry (with the store's modification time) of each lease record."""
        out: dict[int, dict[str, Any]] = {}
        for entry in self._listing(self._lease_dir()):
            match = _GEN_RE.match(entry["name"].rsplit("/", 1)[-1])
            if match:
                out[int(match["gen"])] = entry
        return out

    def lease_generations(self) -> list[int]:
        return sorted(self._lease_entries())

    def read_lease(self, generation: int) -> LeaseInfo | None:
        """The lease record of `generation`; None when it is missing or malformed."""
        return self._lease_record(generation)[0]

    def _lease_record(self, generation: int) -> tuple[LeaseInfo | None, bool]:
        """(record, malformed): a record that is not valid JSON of the lease's shape is
        malformed, which counts as a stale lease (one warning, never a traceback)."""
        return self._lease_read(generation)[:2]

    def _lease_read(self, generation: int) -> tuple[LeaseInfo | None, bool, bytes]:
        """(record, malformed, the stored bytes) of `generation`."""
        path = self._lease_path(generation)
        try:
            raw = self._read_small(path)
        except FileNotFoundError:
            return None, False, b""
        try:
            record = _LeaseRecord.model_validate_json(raw)
        except ValidationError as exc:
            _warn_once(path, "the output's lease record %s is malformed (%s); treating it as stale",
                       full_uri(self.fs, path), exc.errors()[0].get("msg", "invalid") if exc.errors() else "invalid")
            return None, True, raw
        return LeaseInfo(**record.model_dump()), False, raw

    def current_lease(self) -> LeaseInfo | None:
        gens = self.lease_generations()
        return self.read_lease(gens[-1]) if gens else None

    def holder(self) -> LeaseInfo | None:
        """The newest lease when a live run holds it now (not released, its process not gone,
        not stale by its record's age in the store); None when nobody does."""
        entries = self._lease_entries()
        if not entries:
            return None
        generation = max(entries)
        current = self.read_lease(generation)
        if current is None or current.released or current.owner_gone():
            return None
        if stale_reason(current, unchanged_s=0.0, store_age_s=_age_s(entries[generation], time.time())):
            return None
        return current

    def acquire(
        self, run_id: str, *, wait_s: float = 0.0, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S
    ) -> "Lease":
        """Own the output for `run_id`; OutputBusy when a live run holds it past `wait_s`.

        The newest lease may be taken when it is released, malformed, its owner's process is
        gone (seen from the owner's own PID namespace), or it is stale by `stale_reason`:
        unchanged for the TTL on this machine's monotonic clock while waiting, or by the
        store's modification time; the writer's own clock is never trusted alone.
        OutputUnsafe, before anything is written, when one of its folders is a symbolic link.
        """
        self.check_contained()
        deadline = time.monotonic() + wait_s
        watched: tuple[int, bytes, float] | None = None  # (generation, its bytes, monotonic time first seen so)
        while True:
            entries = self._lease_entries()
            gens = sorted(entries)
            current, malformed, raw = self._lease_read(gens[-1]) if gens else (None, False, b"")
            if gens and current is None and not malformed:
                continue  # listed, then gone (pruned by a new owner): look again
            reason: str | None = None
            if current is not None and not current.released:
                seen = time.monotonic()
                if watched is None or watched[:2] != (gens[-1], raw):
                    watched = (gens[-1], raw, seen)
                if current.owner_gone():
                    reason = "its process is gone"
                else:
                    reason = stale_reason(current, unchanged_s=seen - watched[2],
                                          store_age_s=_age_s(entries[gens[-1]], time.time()))
            if current is None or current.released or reason is not None:
                generation = (gens[-1] + 1) if gens else 1
                info = _new_lease(generation, run_id, ttl_s)
                if self.create_exclusive(self._lease_path(generation), _lease_bytes(info),
                                         mine=lambda stored, info=info: _is_record_of(stored, info)):
                    if current is not None and not current.released:
                        log.warning("took over the output from %s, whose lease had lapsed: %s", current.describe(),
                                    reason)
                    self._prune_leases(generation)
                    self._make_stage(generation)
                    return Lease(self, info, heartbeat_s=heartbeat_s)
                watched = None
                continue  # someone else took this generation first: look again
            if time.monotonic() >= deadline:
                holder = current.describe() if current else "another run"
                raise OutputBusy(f"output {full_uri(self.fs, self.root)} is in use by {holder}")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _lease_entry(self, generation: int) -> dict[str, Any] | None:
        path = self._lease_path(generation)
        for entry in self._listing(self._lease_dir()):
            if entry["name"].rstrip("/").endswith(path.rsplit("/", 1)[-1]):
                return entry
        return None

    def _prune_leases(self, keep_from: int) -> None:
        for gen in self.lease_generations():
            if gen < keep_from - 2:  # a few old generations stay for the record
                self.remove(self._lease_path(gen))


# ---------------------------------------------------------------------------------------
# A held lease
# ---------------------------------------------------------------------------------------


class Lease:
    """Ownership of an output by one run (and its fanned-out shard runs), kept fresh by a
    background heartbeat. `ensure()` before each commit; `release()` at the end."""

    def __init__(self, dataset: _LeaseOps, info: LeaseInfo, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.dataset = dataset
        self.info = info
        self.heartbeat_s = heartbeat_s
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @classmethod
    def join(cls, dataset: _LeaseOps, generation: int, run_id: str, *, heartbeat_s: float = HEARTBEAT_S) -> "Lease":
        """Act under a parent run's lease (fanned-out shards): LeaseLost if it is not current."""
        lease = cls(dataset, LeaseInfo(generation, run_id, _host(), os.getpid(), 0.0, 0.0, LEASE_TTL_S),
                    heartbeat_s=heartbeat_s)
        current = dataset.read_lease(generation)
        if current is None or current.run_id != run_id:
            raise LeaseLost(f"run {run_id} holds no lease generation {generation} on the output")
        lease.info = current
        lease.ensure()
        return lease

    def check(self) -> str | None:
        """Why this lease is no longer ours (None while it is)."""
        if self._lost:
            return self._lost
        gens = self.dataset.lease_generations()
        if gens and gens[-1] > self.generation:
            newer = self.dataset.read_lease(gens[-1])
            who = newer.describe() if newer else f"generation {gens[-1]}"
            return f"the output was taken over by {who}"
        current = self.dataset.read_lease(self.generation)
        if current is None:
            return "the lease file disappeared"
        if current.run_id != self.run_id:
            return f"the lease belongs to run {current.run_id}"
        if current.released:
            return "the lease was released"
        return None

    def ensure(self) -> None:
        reason = self.check()
        if reason:
            self._lost = reason
            raise LeaseLost(f"run {self.run_id} lost the output: {reason}")

    def refresh(self) -> None:
        """Renew the heartbeat (only while this generation is still the newest)."""
        self.ensure()
        current = self.dataset.read_lease(self.generation) or self.info
        renewed = LeaseInfo(**{**asdict(current), "heartbeat_at": time.time()})
        self.dataset.write_bytes(self.dataset._lease_path(self.generation), _lease_bytes(renewed))
        self.info = renewed

    def start_heartbeat(self) -> "Lease":
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="docpipe-lease", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage blip: try again next beat
                log.warning("lease heartbeat failed (%s); retrying", exc)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def release(self) -> None:
        """Give the output up (the next run may take it at once)."""
        self.stop_heartbeat()
        if self.check() is None:
            released = LeaseInfo(**{**asdict(self.info), "released": True, "heartbeat_at": time.time()})
            try:
                self.dataset.write_bytes(self.dataset._lease_path(self.generation), _lease_bytes(released))
            except Exception as exc:  # noqa: BLE001 - it lapses by itself after its ttl
                log.warning("could not release the output lease (%s); it lapses in %.0f s", exc, self.info.ttl_s)

    def __enter__(self) -> "Lease":
        return self.start_heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.release()
