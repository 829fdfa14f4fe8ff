"""Work planning: which documents still need doing, and how they are cut into shards.

Pure functions: the inputs are the discovered documents and what the output dataset
already holds; the result is a list of shards with deterministic ids. The same inputs
always give the same shards, so a crashed shard retried anywhere writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.records import DocumentRef, Stage, StageError


@dataclass(frozen=True, slots=True)
class Shard:
    """A unit of work and of output: one pages file and one documents file."""

    shard_id: str
    refs: tuple[DocumentRef, ...]
    # source_uri -> attempt number, for documents an earlier run failed on retryably (else 1)
    attempts: tuple[tuple[str, int], ...] = ()

    def attempt_of(self, uri: str) -> int:
        return dict(self.attempts).get(uri, 1)

    def retried(self) -> list[tuple[str, str]]:
        """(source_uri, doc_id) of the documents this shard tries again."""
        again = {uri for uri, attempt in self.attempts if attempt > 1}
        return [(r.uri, r.doc_id) for r in self.refs if r.uri in again]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "refs": [ref_to_dict(r) for r in self.refs],
            "attempts": [list(pair) for pair in self.attempts],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Shard":
        return cls(
            shard_id=str(data["shard_id"]),
            refs=tuple(ref_from_dict(r) for r in data["refs"]),
            attempts=tuple((str(u), int(a)) for u, a in data.get("attempts", ())),
        )


@dataclass(frozen=True, slots=True)
class ShardPlan:
    shards: tuple[Shard, ...]
    already_done: int  # documents skipped because the dataset already has their row
    to_do: int  # documents in the shards


def ref_to_dict(ref: DocumentRef) -> dict[str, Any]:
    data = dataclasses.asdict(ref)
    if ref.error is not None:
        err = ref.error
        data["error"] = {"stage": err.stage.value, "type": err.type, "message": err.message, "retryable": err.retryable}
    return data


def ref_from_dict(data: dict[str, Any]) -> DocumentRef:
    fields = dict(data)
    err = fields.get("error")
    if err is not None:
        fields["error"] = StageError(
            stage=Stage(err["stage"]), type=err["type"], message=err["message"], retryable=bool(err.get("retryable"))
        )
    return DocumentRef(**fields)


def shard_id_for(refs: Sequence[DocumentRef], fingerprint: str, attempts: Mapping[str, int] | None = None) -> str:
    """Hash of the shard's documents (uri, content, attempt, the id it replaces) and of the
    output-changing settings.

    The attempt is part of it so that a retry of a failed document never lands on the id
    of the committed shard that recorded the failure; the replaced id, so that a file that
    comes back to bytes the output held before (A, then unreadable or B, then A again) is
    not mistaken for the shard that held A and lost that row to the change.
    """
    attempts = attempts or {}
    digest = hashlib.sha256(fingerprint.encode())
    for ref in refs:
        digest.update(b"\n")
        digest.update(ref.uri.encode())
        digest.update(b"\t")
        digest.update(ref.doc_id.encode())
        attempt = attempts.get(ref.uri, 1)
        if attempt > 1:
            digest.update(f"\t{attempt}".encode())
        if ref.replaces is not None:
            digest.update(f"\treplaces:{ref.replaces}".encode())
    return digest.hexdigest()[:20]


def plan_shards(
    refs: Sequence[DocumentRef],
    *,
    done_keys: frozenset[tuple[str, str]] | set[tuple[str, str]],
    processed_elsewhere: Mapping[str, str],
    shard_size: int,
    fingerprint: str,
    retry: Mapping[tuple[str, str], int] | None = None,
) -> ShardPlan:
    """Split the documents not yet done into shards of about `shard_size` (sorted order).

    A document is done when the dataset has a final row for its (uri, doc_id) (bad input
    is recorded once; `retry` lists retryable failures with their attempts so far, which
    are planned again). Copies of content: a copy of bytes processed successfully under
    another name (`processed_elsewhere`: doc_id -> uri with pages) becomes a duplicate
    row; a copy whose original is planned now goes into the original's shard, right after
    it, so the runner can give it the original's outcome; any other copy (its original
    failed or is done elsewhere without pages) is processed on its own.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    retry = retry or {}
    todo = [r for r in sorted(refs, key=lambda r: (r.uri, r.doc_id)) if (r.uri, r.doc_id) not in done_keys]
    planned = {r.uri for r in todo}
    followers: dict[str, list[DocumentRef]] = {}
    leaders: list[DocumentRef] = []
    for ref in todo:
        if ref.error is None and ref.duplicate_of is None and ref.doc_id in processed_elsewhere:
            original = processed_elsewhere[ref.doc_id]
            if original != ref.uri:
                ref = dataclasses.replace(ref, duplicate_of=original)
        elif ref.duplicate_of is not None and ref.duplicate_of not in planned:
            if processed_elsewhere.get(ref.doc_id) not in (None, ref.uri):
                ref = dataclasses.replace(ref, duplicate_of=processed_elsewhere[ref.doc_id])
            else:  # its original is not being processed now and has no pages: do it on its own
                ref = dataclasses.replace(ref, duplicate_of=None)
        if ref.duplicate_of is not None and ref.duplicate_of in planned:
            followers.setdefault(ref.duplicate_of, []).append(ref)
        else:
            leaders.append(ref)
    shards = []
    chunk: list[DocumentRef] = []

    def close() -> None:
        if chunk:
            attempts = {r.uri: retry[(r.uri, r.doc_id)] + 1 for r in chunk if (r.uri, r.doc_id) in retry}
            shards.append(
                Shard(
                    shard_id=shard_id_for(chunk, fingerprint, attempts),
                    refs=tuple(chunk),
                    attempts=tuple(sorted(attempts.items())),
                )
            )
            chunk.clear()

    for ref in leaders:
        chunk.append(ref)
        chunk.extend(followers.get(ref.uri, ()))
        if len(chunk) >= shard_size:
            close()
    close()
    return ShardPlan(shards=tuple(shards), already_done=len(refs) - len(todo), to_do=len(todo))
