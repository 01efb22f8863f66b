"""Operator controls kept in Redis, so the CLI, the HTTP API and the controller agree: pause/resume of the
pipeline's intake of batches. Every change is audited with who made it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from shared.audit import AuditAction, AuditEntry
from shared.streams import EditStreams


def paused_key(streams: EditStreams) -> str:
    return "{" + streams.namespace + "}:paused"


async def pause(streams: EditStreams, principal: str, reason: str = "") -> None:
    """Stop the controller taking new batches (edits are still accepted and wait in the queue: nothing is lost);
    a batch already being computed or rolled out finishes."""
    record = {"by": principal, "at": datetime.now(UTC).isoformat(), "reason": reason}
    await streams.redis.set(paused_key(streams), json.dumps(record))
    await streams.audit.append(AuditEntry(action=AuditAction.paused, principal=principal, detail=reason or None))


async def resume(streams: EditStreams, principal: str) -> bool:
    """Let the controller take batches again; False when it was not paused."""
    was = bool(await streams.redis.delete(paused_key(streams)))
    if was:
        await streams.audit.append(AuditEntry(action=AuditAction.resumed, principal=principal))
    return was


async def paused(streams: EditStreams) -> dict | None:
    raw = await streams.redis.get(paused_key(streams))
    return json.loads(raw) if raw else None
