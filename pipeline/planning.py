"""Work planning: which documents still need doing, and how they are cut into shards.

Pure functions: the inputs are the discovered documents and what the output dataset
already holds; the result is a list of shards with deterministic ids. The same inputs
always give the same shards, so a crashed shard retried anywhere writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.records import DocumentRef, Stage, StageError


@dataclass(frozen=True, slots=True)
class Shard:
    """A unit of work and of output: one pages file and one documents file."""

    shard_id: str
    refs: tuple[DocumentRef, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "refs": [ref_to_dict(r) for r in self.refs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Shard":
        return cls(shard_id=str(data["shard_id"]), refs=tuple(ref_from_dict(r) for r in data["refs"]))


@dataclass(frozen=True, slots=True)
class ShardPlan:
    shards: tuple[Shard, ...]
    already_done: int  # documents skipped because the dataset already has their row
    to_do: int  # documents in the shards


def ref_to_dict(ref: DocumentRef) -> dict[str, Any]:
    data = dataclasses.asdict(ref)
    if ref.error is not None:
        data["error"] = {"stage": ref.error.stage.value, "type": ref.error.type, "message": ref.error.message}
    return data


def ref_from_dict(data: dict[str, Any]) -> DocumentRef:
    fields = dict(data)
    err = fields.get("error")
    if err is not None:
        fields["error"] = StageError(stage=Stage(err["stage"]), type=err["type"], message=err["message"])
    return DocumentRef(**fields)


def shard_id_for(refs: Sequence[DocumentRef], fingerprint: str) -> str:
    """Hash of the shard's documents (uri and content) and of the output-changing settings."""
    digest = hashlib.sha256(fingerprint.encode())
    for ref in refs:
        digest.update(b"\n")
        digest.update(ref.uri.encode())
        digest.update(b"\t")
        digest.update(ref.doc_id.encode())
    return digest.hexdigest()[:20]


def mark_known_duplicates(
    refs: Iterable[DocumentRef], processed_elsewhere: dict[str, str]
) -> list[DocumentRef]:
    """Mark refs whose content an earlier run already processed under another URI.

    `processed_elsewhere` maps doc_id -> a source URI whose pages are in the dataset.
    Refs already marked by discovery (same bytes within this listing) are left as they are.
    """
    out = []
    for ref in refs:
        original = processed_elsewhere.get(ref.doc_id)
        if ref.duplicate_of is None and ref.error is None and original is not None and original != ref.uri:
            ref = dataclasses.replace(ref, duplicate_of=original)
        out.append(ref)
    return out


def plan_shards(
    refs: Sequence[DocumentRef],
    *,
    done_keys: frozenset[tuple[str, str]] | set[tuple[str, str]],
    processed_elsewhere: dict[str, str],
    shard_size: int,
    fingerprint: str,
) -> ShardPlan:
    """Split the documents not yet in the dataset into shards of `shard_size` (sorted order).

    A document is done when the dataset has a documents row for its (uri, doc_id): whatever
    its status, it is not retried (bad input is recorded once). A document whose bytes were
    processed under another name becomes a duplicate row and its pages are not repeated.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    todo = [r for r in sorted(refs, key=lambda r: (r.uri, r.doc_id)) if (r.uri, r.doc_id) not in done_keys]
    todo = mark_known_duplicates(todo, processed_elsewhere)
    shards = []
    for start in range(0, len(todo), shard_size):
        chunk = tuple(todo[start : start + shard_size])
        shards.append(Shard(shard_id=shard_id_for(chunk, fingerprint), refs=chunk))
    return ShardPlan(shards=tuple(shards), already_done=len(refs) - len(todo), to_do=len(todo))
