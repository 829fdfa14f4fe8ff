"""Plans: a shard's documents, written before any of its files (the protocol's step 2).

A rerun replays an uncommitted plan under the same shard id instead of re-sharding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.dataset.store import META, _Store, _warn_once, fault_point
from pipeline.sources import full_uri


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    shard_id: str
    run_id: str
    fingerprint: str
    shard: dict[str, Any]
    created_at: float
    attempts: dict[str, int] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PlanRecord:
    """A shard's composition, written before any of its files."""

    shard_id: str
    run_id: str
    fingerprint: str
    shard: dict[str, Any]  # Shard.to_dict()
    created_at: float
    attempts: dict[str, int] = field(default_factory=dict)  # source_uri -> attempt number in this shard


class _PlanOps(_Store):
    # ---- plans --------------------------------------------------------------------------
    def _plan_path(self, shard_id: str) -> str:
        return self.path(META, "plans", f"{shard_id}.json")

    def write_plan(self, plan: PlanRecord) -> None:
        fault_point("before_plan")
        self.write_bytes(self._plan_path(plan.shard_id), json.dumps(asdict(plan), sort_keys=True).encode())

    def plans(self) -> dict[str, PlanRecord]:
        """Valid plans by shard id (a malformed one is left out, with one warning; `repair`
        moves it to the quarantine)."""
        return self._plans()[0]

    def _plans(self) -> tuple[dict[str, PlanRecord], list[str]]:
        from pipeline.planning import Shard

        out: dict[str, PlanRecord] = {}
        bad: list[str] = []
        for entry in self._listing(self.path(META, "plans")):
            name = entry["name"].rsplit("/", 1)[-1]
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                model = _PlanModel.model_validate_json(self._read_small(entry["name"]))
                Shard.from_dict(model.shard)  # the shard itself must read back
                plan = PlanRecord(**model.model_dump())
            except FileNotFoundError:
                continue
            except (ValidationError, ValueError, KeyError, TypeError) as exc:
                _warn_once(entry["name"], "plan %s is malformed (%s); it is not replayed",
                           full_uri(self.fs, entry["name"]), type(exc).__name__)
                bad.append(entry["name"])
                continue
            out[plan.shard_id] = plan
        return out, bad

    def delete_plan(self, shard_id: str) -> None:
        self.remove(self._plan_path(shard_id))
