"""Undo on demand: revert edits, or roll the served model back to an earlier version, on purpose.

Requests are validated where they are made (the HTTP API, the CLI) and queued in Redis (``{ns}:undo``); the
controller runs them between batches, only while every committed version is live (so each rolls out alone), and
never rewrites history:

* **revert** -- a new version of kind ``revert``: all live edits but the reverted ones, re-solved jointly on the base
  weights (the compaction solve, ``workers/editing/compaction.py``), health-budgeted and rolled out through the
  normal gates. The reverted edits also leave the retrieval tier; their records say ``reverted_in`` and who asked.
  Reverts queued together become one version. An edit served only by the tier just leaves the tier.
* **rollback --to N** -- N (on the head's lineage) becomes head and live again; the versions above it keep their
  numbers and files with status ``reverted``; their edits go to the retrieval tier (still served when there is a
  tier -- revert them too if they were the problem; without one their records say they are not served); reverts
  among the discarded versions no longer hold; workers and replicas follow N at once, and new edits build on N.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from shared.audit import AuditAction, AuditEntry
from shared.outcomes import EditState, Route
from shared.streams import EditStreams
from shared.weight_store import StoreError, VersionManifest, WeightStore

if TYPE_CHECKING:
    from controller.pipeline.compaction import Compactor
    from controller.pipeline.pool import EditWorkerPool
    from controller.pipeline.publish import Publisher

log = logging.getLogger("editq.undo")
MAX_REVERTS_PER_VERSION = 100


class UndoRequest(BaseModel):
    kind: Literal["revert", "rollback"]
    principal: str
    edit_id: str | None = None
    to_version: int | None = Field(default=None, ge=0)
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class UndoRefused(ValueError):
    """The request cannot be done (the message says why); ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _kind(raw: str) -> str | None:
    try:
        return UndoRequest.model_validate_json(raw).kind
    except ValueError:
        return None


async def clear_reverts(streams: EditStreams, edit_ids: list[str], why: str) -> None:
    """The revert of these edits did not hold (its version was rolled back): they answer from the weights again,
    and may be reverted anew."""
    for edit_id in edit_ids:
        key = streams.edit_key(edit_id)
        if await streams.redis.hget(key, "reverted_in") is None:
            continue
        await streams.redis.hdel(key, "reverted_in", "reverted_by")
        await streams.redis.hset(key, mapping={"served_by": Route.weights.value, "updated_at": datetime.now(UTC)
                                               .isoformat()})
        await streams.audit.append(AuditEntry(action=AuditAction.revert_undone, principal="controller",
                                              edit_id=edit_id, detail=why))


def undo_key(streams: EditStreams) -> str:
    return "{" + streams.namespace + "}:undo"


def lineage_above(store: WeightStore, head: int, to_version: int) -> list[VersionManifest] | None:
    """Manifests from ``head`` down to just above ``to_version``, or None when ``to_version`` is not on the lineage."""
    chain, version = [], head
    while version > to_version:
        try:
            manifest = store.manifest(version)
        except StoreError:
            return None
        chain.append(manifest)
        version = manifest.parent
    return chain if version == to_version else None


async def request_revert(streams: EditStreams, edit_id: str, principal: str) -> None:
    status = await streams.status(edit_id)
    if status is None:
        raise UndoRefused(f"no edit with id {edit_id!r}", 404)
    if not status.state.terminal or status.state == EditState.committed:
        raise UndoRefused(f"edit {edit_id!r} is {status.state.value}: revert it once it is decided")
    if status.reverted_in is not None:
        raise UndoRefused(f"edit {edit_id!r} was already reverted in version {status.reverted_in}")
    await _enqueue(streams, UndoRequest(kind="revert", edit_id=edit_id, principal=principal),
                   AuditAction.revert_requested)


async def request_rollback(streams: EditStreams, store: WeightStore, to_version: int, principal: str) -> None:
    head = await streams.head()
    if to_version > head or lineage_above(store, head, to_version) is None:
        raise UndoRefused(f"version {to_version} is not on the lineage of the head (version {head})", 422)
    await _enqueue(streams, UndoRequest(kind="rollback", to_version=to_version, principal=principal),
                   AuditAction.rollback_requested)


async def _enqueue(streams: EditStreams, request: UndoRequest, action: AuditAction) -> None:
    await streams.redis.rpush(undo_key(streams), request.model_dump_json())
    await streams.audit.append(AuditEntry(action=action, principal=request.principal, edit_id=request.edit_id,
                                          version=request.to_version))


class Undo:
    """The controller's side: runs queued undo requests between batches."""

    def __init__(
        self, streams: EditStreams, store: WeightStore, pool: EditWorkerPool, compactor: Compactor,
        publisher: Publisher,
    ) -> None:
        self.streams, self.store, self.pool, self.compactor, self.publisher = streams, store, pool, compactor, publisher
        self.key = undo_key(streams)
        # Puts edits back into / takes them out of the retrieval tier (None: no tier); set with the indexer.
        self.restore: Callable[[list], Awaitable[object]] | None = None
        self.retire: Callable[[list[str]], Awaitable[object]] | None = None

    async def pending(self) -> bool:
        return bool(await self.streams.redis.llen(self.key))

    async def due(self) -> bool:
        """A revert rolls out alone (every committed version live); a rollback needs no rollout in flight (one
        finishing later could make a discarded version live again)."""
        raw = await self.streams.redis.lindex(self.key, 0)
        if raw is None:
            return False
        if _kind(raw) == "rollback":
            return not self.publisher.rolling
        return await self.streams.head() == await self.streams.live()

    async def run(self) -> None:
        """The next rollback, or every queued revert up to the next rollback (as one version). Requests leave the
        queue only once done, so a failure (the loop retries) or a crash loses none; running one twice is harmless
        (a reverted edit is skipped, a rollback to the head is a no-op)."""
        raw = await self.streams.redis.lrange(self.key, 0, MAX_REVERTS_PER_VERSION - 1)
        requests: list[UndoRequest] = []
        for item in raw:
            try:
                requests.append(UndoRequest.model_validate_json(item))
            except ValueError:
                if not requests:  # unreadable at the front: drop it, or it would block every later request
                    await self.streams.redis.lpop(self.key)
                    log.error("dropped an unreadable undo request: %.200s", item)
                    return
                break
        if requests[0].kind == "rollback":
            await self._rollback(requests[0])
            await self.streams.redis.lpop(self.key)
            return
        reverts = []
        for r in requests:
            if r.kind != "revert":
                break
            reverts.append(r)
        await self._revert(reverts)
        await self.streams.redis.lpop(self.key, len(reverts))

    # ---- revert ------------------------------------------------------------------------------------------------
    async def _revert(self, requests: list[UndoRequest]) -> None:
        """Every edit the lineage wrote goes through the revert version (also one the tier serves because it did not
        take: a later compaction would otherwise re-solve it into the weights); others only leave the tier."""
        head = await self.streams.head()
        on_lineage = {e for m in (lineage_above(self.store, head, 0) or []) for e in m.edit_ids}
        statuses = await self.streams.statuses([r.edit_id for r in requests])
        in_weights, tier_only = [], []
        for r in requests:
            status = statuses[r.edit_id]
            if status is None or status.reverted_in is not None:
                continue
            (in_weights if r.edit_id in on_lineage else tier_only).append(r)
        version = None
        if in_weights:
            version = await self.compactor.run("revert", exclude=[r.edit_id for r in in_weights])
            if version is None:
                for r in in_weights:
                    await self._audit(AuditAction.revert_refused, r, detail=self.compactor.last_refusal)
                in_weights = []
        done = in_weights + tier_only
        if not done:
            return
        if self.retire is not None:
            await self.retire([r.edit_id for r in done])
        for r in done:
            # Marked at commit; a canary that rolls the revert version back clears the mark (``clear_reverts``).
            await self.streams.redis.hset(self.streams.edit_key(r.edit_id), mapping={
                "reverted_in": str(version if r in in_weights else head), "reverted_by": r.principal,
                "served_by": "", "updated_at": datetime.now(UTC).isoformat(),
            })
            where = f"in version {version}" if r in in_weights else "from the retrieval tier"
            await self._audit(AuditAction.reverted, r, version=version, detail=f"reverted {where}")
        log.info("reverted %d edits (%d in version %s, %d tier-only)", len(done), len(in_weights), version,
                 len(tier_only))

    # ---- rollback ----------------------------------------------------------------------------------------------
    async def _rollback(self, request: UndoRequest) -> None:
        to = request.to_version
        assert to is not None
        head = await self.streams.head()
        discarded = lineage_above(self.store, head, to)
        if discarded is None:
            await self._audit(AuditAction.rollback_refused, request, version=to,
                              detail=f"not on the lineage of head {head}")
            return
        if await self.streams.revert_head_to(to) != head:
            raise RuntimeError(f"head moved during the rollback to {to}")  # still queued: the loop retries it
        await self.streams.set_live(to)  # head first, then live: a crash between the two is finished by a rerun
        for manifest in discarded:
            await self.streams.set_version_status(manifest.version, "reverted", request.principal)
        await self.streams.set_version_status(to, "live")
        # Reverts discarded with their versions no longer hold: those edits answer again (below, or at `to`).
        undone = [e for m in discarded for e in m.reverted_edit_ids]
        await clear_reverts(self.streams, undone, f"its revert was rolled back to version {to}")
        edits = [r for m in discarded for r in m.edits]
        if edits:  # still served: by the tier instead of the discarded weights (when there is a tier)
            if self.restore is not None:
                await self.restore(edits)
            served = Route.retrieval.value if self.restore is not None else ""
            note = "" if self.restore is not None else "; not served (no retrieval tier)"
            for r in edits:
                await self.streams.redis.hset(self.streams.edit_key(r.edit_id), mapping={
                    "served_by": served,
                    "reason": f"version rolled back to {to} on purpose by {request.principal}{note}",
                })
        try:
            await self.pool.sync(to)
        except Exception as err:  # repaired by the next batch's sync
            log.warning("edit workers not yet at version %d: %s", to, err)
        if self.publisher.rollout is not None:
            await self.publisher.rollout.reconcile()  # replicas follow `live` without gates: on purpose
        numbers = ", ".join(str(m.version) for m in discarded) or "none"
        await self._audit(AuditAction.rolled_back_to, request, version=to,
                          detail=f"from head {head}; versions reverted: {numbers}; {len(edits)} edits to the tier")
        log.warning("rolled back to version %d on request of %s (versions reverted: %s)", to, request.principal,
                    numbers)

    async def _audit(self, action: AuditAction, request: UndoRequest, version: int | None = None,
                     detail: str | None = None) -> None:
        await self.streams.audit.append(AuditEntry(action=action, principal=request.principal,
                                                   edit_id=request.edit_id, version=version, detail=detail))

