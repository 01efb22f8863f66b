"""The knowledge repository: RECIPE entries stored durably in Redis, searched exactly in memory.

Layout under ``prefix`` (one repository per prefix, shared by every router):

* ``{prefix}:entries`` hash edit_id -> JSON (edit_id, statement, the EditRequest, added_at)
* ``{prefix}:keys`` / ``{prefix}:prompts`` hashes edit_id -> raw float32 bytes (key [r], prompt [p, hidden])
* ``{prefix}:log`` stream of ``op=add|retire, edit_id``: routers replay it to stay in sync without reloading
* ``{prefix}:meta`` hash: the checkpoint id the keys were made with (keys of another checkpoint are meaningless)

Writes go to Redis in one MULTI/EXEC (hashes + log entry); every instance, the writer included, applies changes
by replaying the log, so all routers converge on the same set. A fresh instance loads the hashes after noting the
log's last id, so no change is lost between the two reads; a log trimmed past what an instance has seen triggers a
full reload.

Search is exact: one [N, r] float32 matrix-vector product per query (``KnowledgeIndex``), fine to ~1e5 entries
(r = 512: 200 MB of keys, ~14 ms per lookup on one CPU core at 1e5, measured). Prompts are also kept in memory
(p x hidden float32 each, 6.9 KB for SmolLM2). Beyond ~1e5 entries swap the matrix for an approximate
inner-product index (FAISS IVF-PQ or HNSW with the inner-product metric, or Redis' own vector search) for the
top-k candidates, re-score those exactly and keep the sentinel comparison as is, and fetch prompts from Redis on
a hit instead of holding them all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import redis
import torch

from shared.schemas import EditRequest
from workers.retrieval.index import KnowledgeIndex, RetrievalHit, SearchResult

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


def _statement(entry: bytes | None) -> str:
    """The statement of a stored entry (its JSON), or "" when the entry is gone or unreadable."""
    if entry is None:
        return ""
    try:
        return str(json.loads(entry).get("statement", ""))
    except (ValueError, AttributeError):
        return ""


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().float().cpu().contiguous().numpy().tobytes()


class KnowledgeRepository:
    """Durable, shared RECIPE knowledge store: ``add`` / ``retire`` / ``lookup`` (exact search + sentinel)."""

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
    ) -> None:
        self.redis = client or redis.Redis.from_url(url)
        self.prefix = prefix
        self.prompt_shape = (int(prompt_shape[0]), int(prompt_shape[1]))
        self.refresh_interval_s = refresh_interval_s
        self.log_maxlen = log_maxlen
        self.index = KnowledgeIndex(sentinel_key, scale, sentinel_offset)
        self._k = {name: f"{prefix}:{name}" for name in ("entries", "keys", "prompts", "log", "meta")}
        self._claim_checkpoint(checkpoint_id)
        self._last_id: tuple[int, int] | None = None
        self._last_refresh = 0.0
        self.reload()

    def _claim_checkpoint(self, checkpoint_id: str) -> None:
        meta = self._k["meta"]
        self.redis.hsetnx(meta, "checkpoint", checkpoint_id)
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

    def _decode(self, key: bytes, prompt: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.from_numpy(np.frombuffer(key, dtype=np.float32).copy())
        p = torch.from_numpy(np.frombuffer(prompt, dtype=np.float32).copy()).reshape(self.prompt_shape)
        return k, p

    def reload(self) -> None:
        """Rebuild the in-memory index from the hashes (start-up, or after the log was trimmed past us)."""
        last = self.redis.xrevrange(self._k["log"], count=1)
        self.index.clear()
        keys = dict(self.redis.hscan_iter(self._k["keys"], count=1000))
        prompts = self.redis.hmget(self._k["prompts"], list(keys)) if keys else []
        entries = self.redis.hmget(self._k["entries"], list(keys)) if keys else []
        for (edit_id, key), prompt, entry in zip(keys.items(), prompts, entries, strict=True):
            if prompt is not None:
                self.index.add(edit_id.decode(), *self._decode(key, prompt), _statement(entry))
        self._last_id = _stream_id(last[0][0]) if last else (0, 0)
        self._last_refresh = time.monotonic()

    def refresh(self) -> int:
        """Apply changes other routers (or this one) logged since the last refresh; returns how many."""
        log = self._k["log"]
        assert self._last_id is not None
        start = f"({self._last_id[0]}-{self._last_id[1]}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(log, count=1)
        pipe.xrange(log, min=start)
        first, changes = pipe.execute()
        self._last_refresh = time.monotonic()
        if first and _stream_id(first[0][0]) > self._last_id:
            self.reload()
            return len(self.index)
        if not changes:
            return 0
        added = [f[b"edit_id"] for _, f in changes if f[b"op"] == b"add"]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self._k["keys"], added)
        pipe.hmget(self._k["prompts"], added)
        pipe.hmget(self._k["entries"], added)
        keys, prompts, entries = pipe.execute() if added else ([], [], [])
        current = {eid: (k, p, e) for eid, k, p, e in zip(added, keys, prompts, entries, strict=True)}
        for _, fields in changes:
            edit_id = fields[b"edit_id"]
            if fields[b"op"] == b"retire":
                self.index.remove(edit_id.decode())
            else:
                k, p, e = current[edit_id]
                if k is not None and p is not None:  # None: retired again later in this same batch
                    self.index.add(edit_id.decode(), *self._decode(k, p), _statement(e))
        self._last_id = _stream_id(changes[-1][0])
        return len(changes)

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._last_refresh >= self.refresh_interval_s:
            self.refresh()

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
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._k["entries"], edit_id, json.dumps(entry))
        pipe.hset(self._k["keys"], edit_id, _to_bytes(key))
        pipe.hset(self._k["prompts"], edit_id, _to_bytes(prompt))
        pipe.xadd(self._k["log"], {"op": "add", "edit_id": edit_id}, maxlen=self.log_maxlen, approximate=True)
        pipe.execute()
        self.refresh()

    def retire(self, edit_id: str) -> bool:
        """Remove an entry everywhere (e.g. once its weight version is live); False if it was not stored."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self._k["entries"], edit_id)
        pipe.hdel(self._k["keys"], edit_id)
        pipe.hdel(self._k["prompts"], edit_id)
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

    def drop(self) -> None:
        """Delete everything under this prefix (tests, or resetting a tier)."""
        self.redis.delete(*self._k.values())
        self.index.clear()
        self._last_id = (0, 0)
