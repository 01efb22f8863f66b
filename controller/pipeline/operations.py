"""Operator controls kept in Redis, so the CLI, the HTTP API and the controller agree: pause/resume of the
pipeline's intake of batches, and the check (and recovery) for a Redis that lost its state. Every change is audited
with who made it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from shared.audit import AuditAction, AuditEntry
from shared.settings import Settings
from shared.streams import EditStreams
from shared.weight_store import WeightStore, lineage


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


# "retrying" is a normal transient path (an infrastructure blip): still ready, reported as degraded.
UNHEALTHY_STATES = frozenset({"absent", "failed", "stale", "stopped", "lost lease"})
HEARTBEAT_S = 5.0


def heartbeat_key(streams: EditStreams) -> str:
    return "{" + streams.namespace + "}:controller"


async def heartbeat(streams: EditStreams, state: str, error: str | None, ttl_s: float = 12 * HEARTBEAT_S) -> None:
    record = {"state": state, "error": error, "at": datetime.now(UTC).isoformat()}
    await streams.redis.set(heartbeat_key(streams), json.dumps(record), px=int(ttl_s * 1000))


async def heartbeat_loop(streams: EditStreams, current: Callable[[], tuple[str, str | None]],
                         still_leader: Callable[[], Awaitable[bool]]) -> None:
    """The controller's pulse for /healthz, written beside its loop (a long batch does not stop it), while it
    still holds the namespace's lease (``still_leader`` renews it; a lost lease writes no more beats)."""
    while True:
        with contextlib.suppress(Exception):
            if await still_leader():
                await heartbeat(streams, *current())
        await asyncio.sleep(HEARTBEAT_S)


async def controller_health(streams: EditStreams) -> tuple[bool, dict]:
    """(healthy, the controller's last heartbeat); no heartbeat within its TTL means no controller is running."""
    raw = await streams.redis.get(heartbeat_key(streams))
    if raw is None:
        return False, {"state": "absent", "error": "no controller heartbeat"}
    record = json.loads(raw)
    return record.get("state") not in UNHEALTHY_STATES, record


SECRET_SETTINGS = frozenset({"redis_url", "api_key"})


async def record_settings(streams: EditStreams, settings: Settings, principal: str = "controller") -> list[str]:
    """Audit a controller start, and which settings changed since the last one (values, never secrets); returns
    the changed names."""
    now = {k: v for k, v in settings.model_dump(mode="json").items() if k not in SECRET_SETTINGS}
    key = "{" + streams.namespace + "}:settings"
    raw = await streams.redis.get(key)
    before = json.loads(raw) if raw else None
    changed = [] if before is None else sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    await streams.redis.set(key, json.dumps(now, sort_keys=True))
    digest = hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()[:16]
    await streams.audit.append(AuditEntry(action=AuditAction.controller_started, principal=principal,
                                          detail=f"settings sha256:{digest}"))
    if changed:
        detail = "; ".join(f"{k}: {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in changed)
        await streams.audit.append(AuditEntry(action=AuditAction.settings_changed, principal=principal,
                                              detail=detail[:2000]))
    return changed


class RecoveryRefused(RuntimeError):
    """``recover_head`` on a Redis that did not lose its state."""


class RedisStateLostError(RuntimeError):
    """Redis holds no state for the namespace while the weight store holds versions."""


async def check_redis_state(streams: EditStreams, store: WeightStore) -> None:
    """Refuse to run on a Redis that lost its state (e.g. restarted without persistence): it would read head 0 and
    serve the base weights while the store holds committed versions. ``editq recover --head N`` accepts the loss."""
    versions = store.versions()
    if versions and not await streams.redis.exists(streams.head_key, streams.version_seq_key):
        raise RedisStateLostError(
            f"Redis has no state for namespace {streams.namespace!r} but the weight store holds versions up to "
            f"{versions[-1]}: Redis lost its state (restarted without persistence?). Restore Redis from its backup "
            f"(AOF/RDB), or accept the loss with `editq recover --head N` (N: the version to serve; queued edits and "
            "outcomes that were only in Redis are gone)"
        )


async def recover_head(
    streams: EditStreams, store: WeightStore, version: int, principal: str, force: bool = False
) -> None:
    """After a Redis loss: make committed ``version`` (its whole lineage must be in the store) head and live.
    Refused on a Redis that still has state (``force`` overrides: it bypasses the rollout gates)."""
    if not force and await streams.redis.exists(streams.head_key, streams.version_seq_key):
        raise RecoveryRefused(f"Redis still has state for namespace {streams.namespace!r}: nothing to recover (use "
                              "`editq rollback --to N` to go back to a version)")
    lineage(store, version)  # StoreError when a version of the lineage is missing
    await streams.redis.set(streams.head_key, version)
    await streams.set_live(version)
    await streams.redis.set(streams.version_seq_key, max(store.versions(), default=0))  # new numbers stay above
    await streams.set_version_status(version, "live")
    await streams.audit.append(AuditEntry(action=AuditAction.recovered, principal=principal, version=version,
                                          detail="head and live set from the store after a Redis state loss"))
