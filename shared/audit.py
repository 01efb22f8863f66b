"""The audit trail: one append-only Redis stream of every state-changing action, shared by every tier.

Who did what, when, to which edit or version. Entries are written by the same Lua scripts that change the state
(intake, outcomes, version commits; see ``shared/stream_scripts.py``) so an action and its audit entry are one
atomic step, and by the operators' own paths (keys, pause/resume, pins) right after the change. editq never trims
or rewrites this stream (retention is the operator's call: archive it with ``editq audit --json`` and
``XTRIM`` by hand, docs/security.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis


class AuditAction(StrEnum):
    submit = "submit"  # an edit accepted at the door
    committed = "committed"  # an edit in a committed version waiting for its rollout
    applied = "applied"
    rejected = "rejected"
    failed = "failed"
    rolled_back = "rolled_back"
    version_committed = "version_committed"
    version_rolled_back = "version_rolled_back"
    key_created = "key_created"
    key_revoked = "key_revoked"
    paused = "paused"
    resumed = "resumed"
    version_reverted = "version_reverted"  # taken off the lineage by an operator's rollback
    revert_requested = "revert_requested"
    reverted = "reverted"  # an edit taken out of the weights (and the retrieval tier) on demand
    revert_refused = "revert_refused"
    revert_undone = "revert_undone"  # the revert's version was rolled back: the edit answers again
    rollback_requested = "rollback_requested"
    rolled_back_to = "rolled_back_to"  # an operator made an earlier version the head and live version on purpose
    rollback_refused = "rollback_refused"
    compaction_requested = "compaction_requested"
    recovered = "recovered"  # head and live set from the store after Redis lost its state
    controller_started = "controller_started"
    settings_changed = "settings_changed"  # a controller started with other settings than the last one
    replica_restarted = "replica_restarted"  # a planned, drained restart (editq restart-replicas)


class AuditEntry(BaseModel):
    """One audit record (the stream's fields, as strings in Redis)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, description="Redis stream id (time-ordered), set when read back.")
    action: AuditAction
    principal: str = Field(description="Who: the API key's name, an OIDC subject, 'cli:<user>' or 'controller'.")
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    edit_id: str | None = None
    version: int | None = None
    detail: str | None = None

    def fields(self) -> dict[str, str]:
        raw = self.model_dump(mode="json", exclude={"id"}, exclude_none=True)
        return {k: str(v) for k, v in raw.items()}


def audit_key(namespace: str) -> str:
    return "{" + namespace + "}:audit"


class AuditTrail:
    """Append and read the audit stream (append-only: no method here trims or deletes)."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.key = audit_key(namespace)

    async def append(self, entry: AuditEntry) -> str:
        return await self.redis.xadd(self.key, entry.fields())

    async def read(
        self, after: str = "-", count: int = 100, action: AuditAction | None = None, newest_first: bool = False
    ) -> list[AuditEntry]:
        """Entries after stream id ``after`` (exclusive), oldest first, or the newest ``count`` with
        ``newest_first``; ``action`` filters (scanning at most 10x ``count`` entries)."""
        scan = count * 10 if action else count
        if newest_first:
            rows = await self.redis.xrevrange(self.key, count=scan)
        else:
            start = after if after == "-" else f"({after}"
            rows = await self.redis.xrange(self.key, min=start, count=scan)
        entries = [AuditEntry.model_validate({"id": sid, **_text(fields)}) for sid, fields in rows]
        if action:
            entries = [e for e in entries if e.action == action]
        return entries[:count]


def _text(fields: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
