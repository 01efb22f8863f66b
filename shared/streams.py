"""Redis Streams client for the edit queue (Redis 7.0 command subset), shared by the door, the controller and CLI.

Layout (all keys share the hash tag ``{<namespace>}`` so a Redis Cluster keeps them in one slot, which the Lua
scripts below need):

* ``{ns}:edits``     edit stream, consumer groups ``controller`` and ``retrieval``; only entries every group
  acknowledged, older than ``EDITQ_EDIT_STREAM_RETENTION_S``, are trimmed (``trim_processed``)
* ``{ns}:outcomes``  one entry per terminal outcome
* ``{ns}:dlq``       dead letters, with the reason
* ``{ns}:edit:<id>`` per-edit hash (state, stream id, version, reason); also the idempotency record
* ``{ns}:head``      newest committed weight version; ``{ns}:live`` the version the served model runs
* ``{ns}:version:<v>`` per-version hash (status, parent, edit count)

Nothing is lost or applied twice because the state changes that matter are single Lua scripts: intake checks the
idempotency record and appends to the stream atomically; a batch's outcomes, its version commit and the XACKs of
its entries happen together, so an entry is acknowledged only once its outcome is durable, and a re-delivered entry
whose edit already has a terminal outcome is recognised and only acknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import stream_scripts as lua
from shared.audit import AuditAction, AuditEntry, AuditTrail, audit_key
from shared.outcomes import EditOutcome, EditState, EditStatus, ReasonCode, SubmitResult
from shared.schemas import EditRequest

GROUP = "controller"  # the parametric pipeline
RETRIEVAL_GROUP = "retrieval"  # the retrieval-tier indexer: a second, independent reader of every edit

@dataclass(frozen=True)
class StreamEntry:
    """One entry read from the edit stream: the parsed request, or why it could not be parsed."""

    stream_id: str
    fields: dict[str, str]
    request: EditRequest | None
    error: str | None = None

    @property
    def edit_id(self) -> str | None:
        if self.request is not None:
            return self.request.edit_id
        return self.fields.get("edit_id") or None

    @classmethod
    def parse(cls, stream_id: str, fields: dict[str, str]) -> StreamEntry:
        raw = fields.get("request")
        if raw is None:
            return cls(stream_id, fields, None, "entry has no 'request' field")
        try:
            request = EditRequest.model_validate_json(raw)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in err.errors()
            )
            return cls(stream_id, fields, None, f"invalid EditRequest: {problems}")
        if fields.get("edit_id") and fields["edit_id"] != request.edit_id:
            return cls(stream_id, fields, None, "edit_id field does not match the request's edit_id")
        return cls(stream_id, fields, request)


@dataclass(frozen=True)
class Finished:
    """A terminal outcome for one stream entry (``entry`` None when the edit is known but has no live entry)."""

    outcome: EditOutcome
    stream_id: str | None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class EditStreams:
    """Typed access to the edit queue; every method is one round trip or one atomic script."""

    def __init__(self, redis: Redis, namespace: str = "editq", outcome_maxlen: int = 1_000_000) -> None:
        self.redis = redis
        self.namespace = namespace
        self.maxlen = outcome_maxlen
        tag = "{" + namespace + "}"
        self.edits_key = f"{tag}:edits"
        self.outcomes_key = f"{tag}:outcomes"
        self.dlq_key = f"{tag}:dlq"
        self.head_key = f"{tag}:head"
        self.live_key = f"{tag}:live"
        self._edit_prefix = f"{tag}:edit:"
        self._version_prefix = f"{tag}:version:"
        self.audit_key = audit_key(namespace)
        self.version_seq_key = f"{tag}:version_seq"
        self.audit = AuditTrail(redis, namespace)
        self._submit = redis.register_script(lua.SUBMIT)
        self._finish = redis.register_script(lua.FINISH)
        self._dead_letter = redis.register_script(lua.DEAD_LETTER)
        self._mark = redis.register_script(lua.MARK)
        self._revert = redis.register_script(lua.REVERT_HEAD)
        self._revert_to = redis.register_script(lua.REVERT_HEAD_TO)
        self._next_version = redis.register_script(lua.NEXT_VERSION)

    @classmethod
    def from_url(cls, url: str, namespace: str = "editq", outcome_maxlen: int = 1_000_000) -> EditStreams:
        return cls(Redis.from_url(url, decode_responses=True), namespace, outcome_maxlen)

    def edit_key(self, edit_id: str) -> str:
        return self._edit_prefix + edit_id

    def version_key(self, version: int) -> str:
        return f"{self._version_prefix}{version}"

    async def close(self) -> None:
        await self.redis.aclose()

    async def ensure_group(self, group: str = GROUP) -> None:
        """Create the stream and a consumer group if missing (from the start, so nothing queued is skipped)."""
        try:
            await self.redis.xgroup_create(self.edits_key, group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def recover(self, err: Exception, group: str = GROUP) -> None:
        """After a failed read: re-create the group if the stream or group vanished (``NOGROUP``: e.g. the key
        was deleted or Redis restarted without persistence); other errors (a connection blip) just need a retry."""
        if isinstance(err, ResponseError) and "NOGROUP" in str(err):
            await self.ensure_group(group)

    # ---- the door ---------------------------------------------------------------------------------------------
    async def submit(self, request: EditRequest, principal: str | None = None) -> SubmitResult:
        """Queue a validated edit once; an ``edit_id`` seen before is answered with its current state, and flagged
        ``conflict`` when the earlier request said something else (an id reused for other content).

        ``principal`` (who submits, for the audit trail) defaults to the request's ``source``."""
        assert request.edit_id is not None  # set by EditRequest's validator
        created, state, stream_id, stored = await self._submit(
            keys=[self.edit_key(request.edit_id), self.edits_key, self.audit_key],
            args=[request.edit_id, request.model_dump_json(), _now(), principal or request.source],
        )
        conflict = False
        if not int(created) and stored:
            try:
                conflict = EditRequest.model_validate_json(stored).content_key() != request.content_key()
            except ValidationError:
                conflict = True
        return SubmitResult(
            edit_id=request.edit_id, state=EditState(state), duplicate=not int(created), stream_id=stream_id or None,
            conflict=conflict,
        )

    # ---- the consumer -----------------------------------------------------------------------------------------
    async def read(
        self, consumer: str, count: int, block_ms: int | None, own_pending: bool = False, group: str = GROUP
    ) -> list[StreamEntry]:
        """New entries (``>``), or with ``own_pending`` this consumer's delivered-but-unacknowledged ones."""
        reply = await self.redis.xreadgroup(
            group, consumer, {self.edits_key: "0" if own_pending else ">"}, count=count, block=block_ms
        )
        entries: list[StreamEntry] = []
        for _, items in reply or []:
            entries += [StreamEntry.parse(sid, fields) for sid, fields in items if fields is not None]
        return entries

    async def deliveries(self, stream_ids: Sequence[str]) -> dict[str, int]:
        """How often each pending entry has been delivered (for poison detection)."""
        out: dict[str, int] = {}
        for sid in stream_ids:
            rows = await self.redis.xpending_range(self.edits_key, GROUP, min=sid, max=sid, count=1)
            if rows:
                out[sid] = int(rows[0]["times_delivered"])
        return out

    async def idle_pending(self, min_idle_ms: int, count: int = 100) -> list[dict]:
        """Pending entries of any consumer idle longer than ``min_idle_ms`` (id, consumer, deliveries)."""
        return await self.redis.xpending_range(self.edits_key, GROUP, min="-", max="+", count=count, idle=min_idle_ms)

    async def claim(self, consumer: str, stream_ids: Sequence[str], min_idle_ms: int) -> list[StreamEntry]:
        """Take over idle entries (XCLAIM counts as a delivery, so a crash loop ends in the dead letters)."""
        if not stream_ids:
            return []
        items = await self.redis.xclaim(self.edits_key, GROUP, consumer, min_idle_ms, list(stream_ids))
        return [StreamEntry.parse(sid, fields) for sid, fields in items if fields is not None]

    async def fetch(self, stream_id: str) -> dict[str, str] | None:
        items = await self.redis.xrange(self.edits_key, min=stream_id, max=stream_id, count=1)
        return items[0][1] if items else None

    async def statuses(self, edit_ids: Sequence[str]) -> dict[str, EditStatus | None]:
        pipe = self.redis.pipeline(transaction=False)
        for edit_id in edit_ids:
            pipe.hgetall(self.edit_key(edit_id))
        rows = await pipe.execute()
        return {eid: _status(eid, row) for eid, row in zip(edit_ids, rows, strict=True)}

    async def status(self, edit_id: str) -> EditStatus | None:
        return (await self.statuses([edit_id]))[edit_id]

    async def ack(self, stream_ids: Sequence[str], group: str = GROUP) -> int:
        """Acknowledge entries that need no outcome (their edit is decided, or they duplicate a known edit)."""
        return int(await self.redis.xack(self.edits_key, group, *stream_ids)) if stream_ids else 0

    async def mark_in_flight(self, edit_ids: Sequence[str]) -> int:
        return await self.mark(edit_ids, EditState.queued, EditState.in_flight)

    async def mark(self, edit_ids: Sequence[str], from_state: EditState, to_state: EditState) -> int:
        """Move edits still in ``from_state`` to ``to_state`` (never touches a terminal outcome)."""
        if not edit_ids:
            return 0
        args = [_now(), from_state.value, to_state.value]
        return int(await self._mark(keys=[self.edit_key(e) for e in edit_ids], args=args))

    async def finish(
        self,
        finished: Sequence[Finished],
        expect_head: int | None = None,
        new_head: int | None = None,
        version_fields: dict | None = None,
        principal: str = "controller",
    ) -> int:
        """Record outcomes, acknowledge their entries and (optionally) commit a version, atomically.

        Terminal states are also published on the outcome stream; ``committed`` (waiting for its rollout) is not.
        With ``expect_head`` the whole call is refused (returns -1) unless the head is still that version, so a
        stale controller can never commit. Edits that already have a terminal outcome are only acknowledged.
        Returns the number of outcomes recorded.
        """
        args: list[str] = [
            GROUP, "" if expect_head is None else str(expect_head), "" if new_head is None else str(new_head),
            _now(), str(self.maxlen), json.dumps(version_fields or {}), str(len(finished)), principal,
        ]
        keys = [self.edits_key, self.outcomes_key, self.head_key, self.version_key(new_head or 0), self.audit_key]
        for item in finished:
            o = item.outcome
            keys.append(self.edit_key(o.edit_id))
            args += [
                item.stream_id or "", o.edit_id, o.state.value, "" if o.version is None else str(o.version),
                o.reason_code.value if o.reason_code else "", o.reason or "",
                o.served_by.value if o.served_by else "", o.model_dump_json(),
            ]
        return int(await self._finish(keys=keys, args=args))

    async def dead_letter(self, entry: StreamEntry, code: ReasonCode, reason: str, deliveries: int | None) -> None:
        """Move an entry to the dead letters with its reason; a known edit also gets its terminal ``failed``."""
        fields = {
            "stream_id": entry.stream_id, "edit_id": entry.edit_id or "", "reason_code": code.value,
            "reason": reason, "deliveries": str(deliveries or ""), "payload": json.dumps(entry.fields),
            "at": _now(),
        }
        status = await self.status(entry.edit_id) if entry.edit_id else None
        owns_edit = entry.edit_id and (status is None or status.stream_id in (None, entry.stream_id))
        if owns_edit:  # never fail a real edit because a corrupt copy of its id was dead-lettered
            outcome = EditOutcome(
                edit_id=entry.edit_id, state=EditState.failed, reason_code=code, reason=reason,
                stream_id=entry.stream_id,
            )
            await self.finish([Finished(outcome, None)])
        flat = [x for kv in fields.items() for x in kv]
        await self._dead_letter(keys=[self.edits_key, self.dlq_key], args=[GROUP, entry.stream_id, self.maxlen, *flat])

    # ---- versions -----------------------------------------------------------------------------------------------
    async def head(self) -> int:
        return int(await self.redis.get(self.head_key) or 0)

    async def live(self) -> int:
        return int(await self.redis.get(self.live_key) or 0)

    async def set_live(self, version: int) -> None:
        await self.redis.set(self.live_key, version)

    async def revert_head(self, version: int, to_version: int) -> bool:
        """Take a rolled-back ``version`` off the lineage: the head returns to ``to_version`` if it is still
        ``version``, so the next batch builds on the weights that are actually served."""
        return bool(await self._revert(keys=[self.head_key], args=[str(version), str(to_version)]))

    async def revert_head_to(self, to_version: int) -> int:
        """Take every version above ``to_version`` off the lineage (a rollback while later versions were already
        committed on the refused one); returns the head it had, so the caller knows which versions it discarded.
        Atomic with commits: a commit computed on a discarded head is refused (``finish`` with ``expect_head``)."""
        return int(await self._revert_to(keys=[self.head_key], args=[str(to_version)]))

    async def requests(self, edit_ids: Sequence[str]) -> dict[str, EditRequest]:
        """The accepted requests of known edits (kept in their state records since intake)."""
        pipe = self.redis.pipeline(transaction=False)
        for edit_id in edit_ids:
            pipe.hget(self.edit_key(edit_id), "request")
        raw = await pipe.execute()
        out: dict[str, EditRequest] = {}
        for edit_id, stored in zip(edit_ids, raw, strict=True):
            if stored:
                try:
                    out[edit_id] = EditRequest.model_validate_json(stored)
                except ValidationError:  # written under other rules (or tampered with): the caller sees it missing
                    continue
        return out

    async def set_version_status(self, version: int, status: str, principal: str = "controller") -> None:
        await self.redis.hset(self.version_key(version), mapping={"status": status, "updated_at": _now()})
        actions = {"rolled_back": AuditAction.version_rolled_back, "reverted": AuditAction.version_reverted}
        if status in actions:
            await self.audit.append(AuditEntry(action=actions[status], principal=principal, version=version))

    async def next_version(self, floor: int = 0) -> int:
        """A fresh version number: above every number handed out before, the head and ``floor`` (the store's
        newest), so a rolled-back version's number and files are never reused."""
        return int(await self._next_version(keys=[self.version_seq_key, self.head_key], args=[str(floor)]))

    async def version_info(self, version: int) -> dict[str, str]:
        return await self.redis.hgetall(self.version_key(version))

    # ---- observing ----------------------------------------------------------------------------------------------
    async def outcomes(
        self, after: str = "0", count: int = 100, block_ms: int | None = None
    ) -> list[tuple[str, EditOutcome]]:
        """Outcomes after stream id ``after`` (``$`` for only new ones), oldest first."""
        reply = await self.redis.xread({self.outcomes_key: after}, count=count, block=block_ms)
        out: list[tuple[str, EditOutcome]] = []
        for _, items in reply or []:
            out += [(sid, EditOutcome.model_validate_json(f["outcome"])) for sid, f in items]
        return out

    async def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        return await self.redis.xrange(self.dlq_key, count=count)

    async def queue_depth(self) -> dict[str, int]:
        """Entries not yet delivered (lag) and delivered but unacknowledged (pending)."""
        try:
            groups = await self.redis.xinfo_groups(self.edits_key)
        except ResponseError:
            return {"lag": 0, "pending": 0, "length": 0}
        group = next((g for g in groups if g["name"] == GROUP), None)
        length = await self.redis.xlen(self.edits_key)
        if group is None:
            return {"lag": length, "pending": 0, "length": length}
        lag = group.get("lag")
        return {"lag": int(lag if lag is not None else 0), "pending": int(group["pending"]), "length": length}

    async def trim_processed(self, retention_s: float) -> int:
        """Drop edit-stream entries that every consumer group has acknowledged and that are older than
        ``retention_s``; returns how many went. Nothing pending or undelivered is ever trimmed (an entry's request
        also lives in its edit record, the manifests and the audit trail, so history keeps it)."""
        try:
            groups = await self.redis.xinfo_groups(self.edits_key)
        except ResponseError:
            return 0
        if not groups:
            return 0
        bounds = [_stream_id(f"{int((datetime.now(UTC).timestamp() - retention_s) * 1000)}-0")]
        for group in groups:
            summary = await self.redis.xpending(self.edits_key, group["name"]) if int(group["pending"]) else None
            if summary and summary.get("min"):
                bounds.append(_stream_id(summary["min"]))  # the oldest entry still being worked on
            else:  # nothing pending (or acknowledged since XINFO): everything delivered to this group is done
                ms, seq = _stream_id(group["last-delivered-id"])
                bounds.append((ms, seq + 1))
        ms, seq = min(bounds)
        if ms <= 0:
            return 0
        return int(await self.redis.xtrim(self.edits_key, minid=f"{ms}-{seq}", approximate=False))

    async def delete_namespace(self) -> int:
        """Remove every key of this namespace (tests and `editq reset`)."""
        deleted = 0
        async for key in self.redis.scan_iter(match="{" + self.namespace + "}:*", count=1000):
            deleted += await self.redis.delete(key)
        return deleted


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _status(edit_id: str, row: dict[str, str]) -> EditStatus | None:
    if not row:
        return None
    clean = {k: v for k, v in row.items() if v != "" and k != "request"}
    return EditStatus.model_validate({"edit_id": edit_id, **clean})
