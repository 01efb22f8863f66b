"""The knowledge repository: RECIPE entries stored durably in Redis, searched exactly in memory.

Layout under ``prefix`` (one repository per prefix, shared by every router):

* ``{prefix}:entries`` hash edit_id -> JSON (edit_id, statement, the EditRequest, added_at)
* ``{prefix}:keys`` / ``{prefix}:prompts`` hashes edit_id -> raw float32 bytes (key [r], prompt [p, hidden])
* ``{prefix}:log`` stream of ``op=add|retire, edit_id``: routers replay it to stay in sync without reloading
  (``op=checkpoint``: the prefix was re-encoded for another checkpoint, ``reindex.py``)
* ``{prefix}:meta`` hash: the checkpoint id the keys were made with (keys of another checkpoint are meaningless;
  an instance with newer heads re-encodes the stored edits for them at start, ``reindex.py``)
* ``{prefix}:sums`` hash edit_id -> sha256 of key, prompt and statement: an entry is validated (checksum, size,
  finite values, statement length) before it can be put in front of a query; a bad one is skipped and logged

Reads survive a Redis outage: a failed change-log replay is logged once, counted (``stale_since``), and lookups keep
answering from the last in-memory copy until Redis answers again.

Writes go to Redis in one MULTI/EXEC (hashes + log entry); every instance, the writer included, applies changes
by replaying the log, so all routers converge on the same set. A fresh instance loads the hashes after noting the
log's last id, so no change is lost between the two reads; a log trimmed past what an instance has seen triggers a
full reload.

Search is ``KnowledgeIndex``'s: exact below ``retrieval_ann_min_entries`` (1e5), a faiss product-quantised index
for candidates re-scored exactly beyond (scores and the sentinel rule unchanged; docs/retrieval.md has recall and
latency at 1e6); with the subject gate (the default) only among the entries a query names. Prompts are kept in
memory (p x hidden float32 each, 6.9 KB for SmolLM2: 6.9 GB at 1e6 entries); fetching them from Redis on a hit
instead is the next step at that scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import redis
import torch

from shared.schemas import EditRequest
from workers.retrieval.ann import AnnConfig
from workers.retrieval.index import KnowledgeIndex, RetrievalHit, SearchResult
from workers.retrieval.reindex import Encode, key_names, reindex

log = logging.getLogger("editq.retrieval")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "editq:retrieval"


class CheckpointMismatchError(RuntimeError):
    """The Redis prefix holds keys made by another RECIPE checkpoint."""


@dataclass(frozen=True)
class StoredEntry:
    edit_id: str
    statement: str
    edit: EditRequest
    added_at: str


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, seq = text.split("-")
    return int(ms), int(seq)


OUTAGE_RETRY_S = 5.0  # between refresh attempts while Redis does not answer
MAX_STATEMENT_CHARS = 2000  # an edit's prompt + target fit easily; a forged entry cannot flood the query


def _statement(entry: bytes | None) -> str:
    """The statement of a stored entry (its JSON), or "" when the entry is gone, unreadable or oversized."""
    if entry is None:
        return ""
    try:
        statement = str(json.loads(entry).get("statement", ""))
    except (ValueError, AttributeError):
        return ""
    return statement if len(statement) <= MAX_STATEMENT_CHARS else ""


def _subject(entry: bytes | None) -> str | None:
    """The stored edit's subject (for the subject gate), or None when unknown (then the entry is never gated out)."""
    try:
        subject = json.loads(entry or b"{}").get("edit", {}).get("subject")
    except (ValueError, AttributeError):
        return None
    return subject if isinstance(subject, str) and len(subject) <= MAX_STATEMENT_CHARS else None


def _checksum(key: bytes, prompt: bytes, statement: str) -> str:
    return hashlib.sha256(key + b"|" + prompt + b"|" + statement.encode()).hexdigest()[:32]


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().float().cpu().contiguous().numpy().tobytes()


class KnowledgeRepository:
    """Durable, shared RECIPE knowledge store: ``add`` / ``retire`` / ``lookup`` (search + sentinel)."""

    def __init__(
        self,
        sentinel_key: torch.Tensor,
        scale: float,
        sentinel_offset: float,
        prompt_shape: tuple[int, int],
        checkpoint_id: str,
        url: str = DEFAULT_REDIS_URL,
        prefix: str = DEFAULT_PREFIX,
        refresh_interval_s: float = 0.2,
        log_maxlen: int = 1_000_000,
        client: redis.Redis | None = None,
        ann: AnnConfig | None = None,
        reencode: Encode | None = None,
    ) -> None:
        """``reencode`` (this checkpoint's heads, edits -> keys and prompts): when the prefix holds another
        checkpoint's keys, re-encode the stored edits for this one instead of refusing to start."""
        # Short timeouts: a Redis that stops answering must not hold every query behind the tier's lock.
        self.redis = client or redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)
        self.prefix = prefix
        self.prompt_shape = (int(prompt_shape[0]), int(prompt_shape[1]))
        self.refresh_interval_s = refresh_interval_s
        self.log_maxlen = log_maxlen
        self.index = KnowledgeIndex(sentinel_key, scale, sentinel_offset, ann=ann)
        self._k = key_names(prefix)
        self.stale_since: float | None = None  # monotonic time of the first failed refresh of an ongoing outage
        self.rejected_entries = 0  # entries skipped by validation (checksum, size, non-finite values)
        self.checkpoint_id = checkpoint_id
        self.superseded_by: str | None = None  # set when the prefix was re-encoded for another checkpoint
        self._claim_checkpoint(checkpoint_id, reencode)
        self._last_id: tuple[int, int] | None = None
        self._last_refresh = 0.0
        self.reload()

    def _claim_checkpoint(self, checkpoint_id: str, reencode: Encode | None) -> None:
        meta = self._k["meta"]
        self.redis.hsetnx(meta, "checkpoint", checkpoint_id)
        stored = self.redis.hget(meta, "checkpoint")
        if stored is not None and stored.decode() != checkpoint_id and reencode is not None:
            reindex(self.redis, self.prefix, checkpoint_id, reencode, _checksum, _to_bytes, self.log_maxlen)
            stored = self.redis.hget(meta, "checkpoint")
        if stored is not None and stored.decode() != checkpoint_id:
            raise CheckpointMismatchError(
                f"Redis prefix {self.prefix!r} holds keys of checkpoint {stored.decode()}, not {checkpoint_id}: "
                "use another prefix or re-add the edits with this checkpoint"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self.index

    def _decode(self, edit_id: bytes, key: bytes, prompt: bytes, statement: str, checksum: bytes | None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Key and prompt of a stored entry, or None (logged, counted) when it fails validation: a checksum that does
        not match its key, prompt and statement (corruption, a partial or foreign write), a size other than the
        checkpoint's, or a non-finite value. These bytes go straight into the served model's input. The checksum is
        an integrity check, not authentication (whoever can write Redis can recompute it): protect Redis itself
        with AUTH/ACLs; entries written before checksums existed are checked for size and values only."""
        name = edit_id.decode(errors="replace")
        problem = None
        if checksum is not None and checksum.decode(errors="replace") != _checksum(key, prompt, statement):
            problem = "checksum mismatch"
        elif len(key) != 4 * self.index.rep_dim or len(prompt) != 4 * self.prompt_shape[0] * self.prompt_shape[1]:
            problem = f"size {len(key)}/{len(prompt)} bytes, expected {4 * self.index.rep_dim}/" \
                      f"{4 * self.prompt_shape[0] * self.prompt_shape[1]}"
        if problem is None:
            k = torch.from_numpy(np.frombuffer(key, dtype=np.float32).copy())
            p = torch.from_numpy(np.frombuffer(prompt, dtype=np.float32).copy()).reshape(self.prompt_shape)
            if torch.isfinite(k).all() and torch.isfinite(p).all():
                return k, p
            problem = "non-finite values"
        self.rejected_entries += 1
        log.error("retrieval entry %s skipped: %s (it is not served)", name, problem)
        return None

    def reload(self) -> None:
        """Rebuild the in-memory index from the hashes (start-up, or after the log was trimmed past us)."""
        last = self.redis.xrevrange(self._k["log"], count=1)
        fresh = KnowledgeIndex(self.index.sentinel_key, self.index.scale, self.index.sentinel_offset,
                               ann=self.index.ann_config)
        keys = dict(self.redis.hscan_iter(self._k["keys"], count=1000))
        ids = list(keys)
        prompts = self.redis.hmget(self._k["prompts"], ids) if keys else []
        entries = self.redis.hmget(self._k["entries"], ids) if keys else []
        sums = self.redis.hmget(self._k["sums"], ids) if keys else []
        for (edit_id, key), prompt, entry, checksum in zip(keys.items(), prompts, entries, sums, strict=True):
            statement = _statement(entry)
            if prompt is not None and (decoded := self._decode(edit_id, key, prompt, statement, checksum)):
                fresh.add(edit_id.decode(), *decoded, statement, _subject(entry))
        self.index = fresh  # swapped in only once every read succeeded: a failed reload keeps the old copy
        self._last_id = _stream_id(last[0][0]) if last else (0, 0)
        self._last_refresh = time.monotonic()

    def refresh(self) -> int:
        """Apply changes other routers (or this one) logged since the last refresh; returns how many. Once the prefix
        was handed to another checkpoint nothing more is applied: this instance answers from memory (``reindex.py``)."""
        if self.superseded_by is not None:
            return 0
        log_key = self._k["log"]
        assert self._last_id is not None
        start = f"({self._last_id[0]}-{self._last_id[1]}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(log_key, count=1)
        pipe.xrange(log_key, min=start)
        first, changes = pipe.execute()
        self._last_refresh = time.monotonic()
        if first and _stream_id(first[0][0]) > self._last_id:
            self.reload()
            return len(self.index)
        if not changes:
            return 0
        handover = next((i for i, (_, f) in enumerate(changes) if f[b"op"] == b"checkpoint"), None)
        if handover is not None:
            self._apply(changes[:handover])
            fields = changes[handover][1]
            if fields.get(b"checkpoint", b"").decode() == self.checkpoint_id:
                self.reload()  # re-encoded for this instance's own heads (it, or a peer of the same release)
                return len(changes)
            self.superseded_by = fields.get(b"checkpoint", b"?").decode()
            log.warning("retrieval tier %s: re-encoded for checkpoint %s; this instance (%s) keeps serving its "
                        "in-memory copy of %d entries until it is restarted with the new checkpoint", self.prefix,
                        self.superseded_by, self.checkpoint_id, len(self.index))
            return handover
        self._apply(changes)
        return len(changes)

    def _apply(self, changes: list) -> None:
        """Replay add/retire ops of the log onto the in-memory index."""
        if not changes:
            return
        added = [f[b"edit_id"] for _, f in changes if f[b"op"] == b"add"]
        pipe = self.redis.pipeline(transaction=True)  # one consistent view of an entry (a writer uses MULTI too)
        for name in ("keys", "prompts", "entries", "sums"):
            pipe.hmget(self._k[name], added)
        keys, prompts, entries, sums = pipe.execute() if added else ([], [], [], [])
        current = {eid: row for eid, *row in zip(added, keys, prompts, entries, sums, strict=True)}
        for _, fields in changes:
            edit_id = fields[b"edit_id"]
            if fields[b"op"] == b"retire":
                self.index.remove(edit_id.decode())
            else:
                k, p, e, checksum = current[edit_id]
                if k is None or p is None:  # retired again later in this same batch
                    continue
                self.index.remove(edit_id.decode())  # a replaced entry that fails validation must not linger
                statement = _statement(e)
                if (decoded := self._decode(edit_id, k, p, statement, checksum)) is not None:
                    self.index.add(edit_id.decode(), *decoded, statement, _subject(e))
        self._last_id = _stream_id(changes[-1][0])

    def _maybe_refresh(self) -> None:
        """Replay the change log when due; during a Redis outage keep serving the last in-memory copy."""
        if time.monotonic() - self._last_refresh < self.refresh_interval_s:
            return
        try:
            self.refresh()
        except redis.RedisError as err:
            # Retry after a pause, not on every query: each attempt can cost up to the socket timeout.
            self._last_refresh = time.monotonic() + OUTAGE_RETRY_S
            if self.stale_since is None:
                self.stale_since = time.monotonic()
                log.warning("retrieval tier: Redis unreachable (%s); serving the last in-memory copy of %d entries",
                            err, len(self.index))
            return
        if self.stale_since is not None:
            log.warning("retrieval tier: Redis answers again after %.1f s; back in sync",
                        time.monotonic() - self.stale_since)
            self.stale_since = None

    @property
    def stale_seconds(self) -> float:
        """How long lookups have been answered from memory because Redis did not answer (0 when in sync)."""
        return 0.0 if self.stale_since is None else time.monotonic() - self.stale_since

    def add(self, edit: EditRequest, statement: str, key: torch.Tensor, prompt: torch.Tensor) -> None:
        """Store one entry durably (re-adding an edit_id replaces it) and make it searchable here at once."""
        if tuple(prompt.shape) != self.prompt_shape:
            raise ValueError(f"prompt must be {self.prompt_shape}, got {tuple(prompt.shape)}")
        edit_id = str(edit.edit_id)
        entry = {
            "edit_id": edit_id,
            "statement": statement,
            "edit": edit.model_dump(mode="json"),
            "added_at": datetime.now(UTC).isoformat(),
        }
        if len(statement) > MAX_STATEMENT_CHARS:
            raise ValueError(f"statement longer than {MAX_STATEMENT_CHARS} characters")
        key_bytes, prompt_bytes = _to_bytes(key), _to_bytes(prompt)
        with self.redis.pipeline(transaction=True) as pipe:
            # Keys made by other heads than the prefix's would be meaningless to every reader: refuse (WATCH
            # aborts the write if the prefix changes hands between this check and EXEC).
            pipe.watch(self._k["meta"])
            claimed = pipe.hget(self._k["meta"], "checkpoint")
            if claimed is not None and claimed.decode() != self.checkpoint_id:
                raise CheckpointMismatchError(
                    f"Redis prefix {self.prefix!r} now belongs to checkpoint {claimed.decode()}; this instance has "
                    f"{self.checkpoint_id}: restart it with the new checkpoint (edit {edit_id} not written)"
                )
            pipe.multi()
            pipe.hset(self._k["entries"], edit_id, json.dumps(entry))
            pipe.hset(self._k["keys"], edit_id, key_bytes)
            pipe.hset(self._k["prompts"], edit_id, prompt_bytes)
            pipe.hset(self._k["sums"], edit_id, _checksum(key_bytes, prompt_bytes, statement))
            pipe.xadd(self._k["log"], {"op": "add", "edit_id": edit_id}, maxlen=self.log_maxlen, approximate=True)
            pipe.execute()
        self.refresh()

    def retire(self, edit_id: str) -> bool:
        """Remove an entry everywhere (e.g. once its weight version is live); False if it was not stored."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._k["entries"], edit_id)
        pipe.hdel(self._k["keys"], edit_id)
        pipe.hdel(self._k["prompts"], edit_id)
        pipe.hdel(self._k["sums"], edit_id)
        pipe.xadd(self._k["log"], {"op": "retire", "edit_id": edit_id}, maxlen=self.log_maxlen, approximate=True)
        existed = bool(pipe.execute()[0])
        self.refresh()
        return existed

    def entry(self, edit_id: str) -> StoredEntry | None:
        raw = self.redis.hget(self._k["entries"], edit_id)
        if raw is None:
            return None
        data = json.loads(raw)
        return StoredEntry(
            data["edit_id"], data["statement"], EditRequest.model_validate(data["edit"]), data["added_at"]
        )

    def search(self, queries: torch.Tensor, refresh: bool = True) -> list[SearchResult]:
        if refresh:
            self._maybe_refresh()
        return self.index.search(queries)

    def lookup(self, query: torch.Tensor, refresh: bool = True) -> RetrievalHit | None:
        """Top-1 entry if it beats the sentinel for this query key, else None (refreshes at most every
        ``refresh_interval_s``, so other routers' adds are visible within that)."""
        if refresh:
            self._maybe_refresh()
        return self.index.lookup(query)

    def lookup_all(self, query: torch.Tensor, k: int, refresh: bool = True) -> list[RetrievalHit]:
        if refresh:
            self._maybe_refresh()
        return self.index.lookup_all(query, k)

    def candidates(self, query_text: str) -> set[str]:
        """The entries a query names (the subject gate), after a due refresh: none means no lookup is needed."""
        self._maybe_refresh()
        return self.index.gate.candidates(query_text)

    def lookup_among(self, query: torch.Tensor, k: int, among: set[str]) -> list[RetrievalHit]:
        return self.index.lookup_among(query, k, among)

    def drop(self) -> None:
        """Delete everything under this prefix (tests, or resetting a tier)."""
        self.redis.delete(*self._k.values())
        self.index.clear()
        self._last_id = (0, 0)
