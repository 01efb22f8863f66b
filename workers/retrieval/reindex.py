"""Hand a tier's Redis prefix to a new RECIPE checkpoint: re-encode every stored edit with its heads, in place.

Keys and prompts are only meaningful to the heads that made them, so a deployment that upgrades its checkpoint
(a new editq release, a retrained head) would otherwise find a prefix it cannot use. Every entry keeps its
``EditRequest`` and statement, so the new heads can rebuild the keys and prompts without losing an edit.

One transaction replaces every key, prompt and checksum, claims the prefix for the new checkpoint and logs
``op=checkpoint``. It is optimistic (``WATCH`` on the log and the claim): an edit added or retired meanwhile, or
another new instance migrating at the same moment, restarts it or finds it done. Readers with the old heads see the
logged op, stop replaying (what they would replay next is meaningless to them) and keep answering from their
in-memory copy until they are restarted with the new checkpoint; writers with the old heads are refused
(``KnowledgeRepository.add``), so a rolling upgrade serves consistent answers throughout and loses nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

import redis
import torch

from shared.schemas import EditRequest

log = logging.getLogger("editq.retrieval")
Encode = Callable[[Sequence[EditRequest]], tuple[torch.Tensor, torch.Tensor]]  # edits -> (keys, prompts)
MAX_ATTEMPTS = 20


def key_names(prefix: str) -> dict[str, str]:
    """The Redis keys of one tier (layout: ``workers/retrieval/repository.py``)."""
    return {name: f"{prefix}:{name}" for name in ("entries", "keys", "prompts", "log", "meta", "sums")}


def _readable(raw: dict[bytes, bytes]) -> list[tuple[str, str, EditRequest]]:
    out = []
    for edit_id, blob in raw.items():
        try:
            data = json.loads(blob)
            out.append((edit_id.decode(), str(data["statement"]), EditRequest.model_validate(data["edit"])))
        except (ValueError, KeyError, TypeError):
            log.error("retrieval entry %s is unreadable and is left out of the re-index", edit_id[:64])
    return out


def reindex(
    client: redis.Redis,
    prefix: str,
    checkpoint_id: str,
    encode: Encode,
    checksum: Callable[[bytes, bytes, str], str],
    to_bytes: Callable[[torch.Tensor], bytes],
    log_maxlen: int = 1_000_000,
    batch: int = 256,
) -> int:
    """Re-encode every stored edit for ``checkpoint_id`` and claim ``prefix`` for it; returns the entries moved
    (0 when another instance did it first)."""
    k = key_names(prefix)
    for _ in range(MAX_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(k["meta"], k["log"])
                claimed = pipe.hget(k["meta"], "checkpoint")
                if claimed is not None and claimed.decode() == checkpoint_id:
                    return 0
                entries = _readable(pipe.hgetall(k["entries"]))
                rows: list[tuple[str, bytes, bytes, str]] = []
                for start in range(0, len(entries), batch):
                    part = entries[start : start + batch]
                    keys, prompts = encode([edit for _, _, edit in part])
                    for (edit_id, statement, _), key, prompt in zip(part, keys, prompts, strict=True):
                        rows.append((edit_id, to_bytes(key), to_bytes(prompt), statement))
                pipe.multi()
                for edit_id, key, prompt, statement in rows:
                    pipe.hset(k["keys"], edit_id, key)
                    pipe.hset(k["prompts"], edit_id, prompt)
                    pipe.hset(k["sums"], edit_id, checksum(key, prompt, statement))
                pipe.hset(k["meta"], "checkpoint", checkpoint_id)
                pipe.xadd(k["log"], {"op": "checkpoint", "edit_id": "", "checkpoint": checkpoint_id},
                          maxlen=log_maxlen, approximate=True)
                pipe.execute()
            except redis.WatchError:
                continue  # an edit came or went, or another instance migrated: look again
        previous = None if claimed is None else claimed.decode()
        log.warning("retrieval tier %s: re-encoded %d stored edits for checkpoint %s (was %s)", prefix, len(rows),
                    checkpoint_id, previous)
        return len(rows)
    raise RuntimeError(f"retrieval tier {prefix}: the re-index kept conflicting with writers ({MAX_ATTEMPTS} tries)")
