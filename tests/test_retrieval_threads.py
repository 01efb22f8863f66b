"""The retrieval tier inside a replica is used from many request threads at once while entries come and go
(``asyncio.to_thread`` per request, change-log replays that move rows): lookups never fail or return an entry that
was never stored."""

from __future__ import annotations

import threading
import uuid

import torch

from workers.datasets import bundled_counterfact_path, load_edits
from workers.retrieval.tier import RetrievalTier

REDIS_URL = "redis://127.0.0.1:6379/0"
CHURN_ROUNDS = 40


def _fast(tier: RetrievalTier, edits) -> None:
    """Encode once and answer from a cache, so the threads spend their time in the store (where a race would be)
    rather than in the sentence encoder."""
    queries = {e.text: k for e, k in zip(edits, tier._query_keys([e.text for e in edits]), strict=True)}
    encoded = dict(zip((str(e.edit_id) for e in edits), zip(*tier.encode_edits(edits), strict=True), strict=True))
    tier._query_keys = lambda texts: torch.stack([queries[t] for t in texts])  # type: ignore[method-assign]

    def encode(batch):
        keys, prompts = zip(*(encoded[str(e.edit_id)] for e in batch), strict=True)
        return torch.stack(keys), torch.stack(prompts)

    tier.encode_edits = encode  # type: ignore[method-assign]


def _hammer(tier: RetrievalTier, edits, writer_tier: RetrievalTier) -> tuple[list[BaseException], set[str]]:
    _fast(tier, edits)
    if writer_tier is not tier:
        _fast(writer_tier, edits)
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def query(offset: int) -> None:
        i = offset
        try:
            while not stop.is_set():
                hit = tier.lookup(edits[i % len(edits)].text)
                if hit is not None:
                    seen.add(hit.edit_id)
                i += 1
        except BaseException as err:
            errors.append(err)

    def churn() -> None:
        try:
            for _ in range(CHURN_ROUNDS):
                for edit in edits[10:]:
                    writer_tier.retire(str(edit.edit_id))
                writer_tier.add_many(edits[10:])
        except BaseException as err:
            errors.append(err)
        finally:
            stop.set()

    threads = [threading.Thread(target=query, args=(k,)) for k in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return errors, seen


def test_concurrent_lookups_while_entries_are_added_and_retired() -> None:
    edits = load_edits(bundled_counterfact_path(), limit=30).requests
    tier = RetrievalTier.load()  # in memory: the same object serves the queries and takes the writes
    tier.add_many(edits)
    errors, seen = _hammer(tier, edits, tier)
    assert not errors, errors[:3]
    assert seen and seen <= {str(e.edit_id) for e in edits}
    assert len(tier) == len(edits)


def test_concurrent_lookups_on_a_redis_tier_while_another_router_writes() -> None:
    edits = load_edits(bundled_counterfact_path(), limit=30).requests
    prefix = f"editq-test:retrieval:{uuid.uuid4().hex[:12]}"
    writer = RetrievalTier.load(redis_url=REDIS_URL, prefix=prefix)
    try:
        writer.add_many(edits)
        reader = RetrievalTier.load(redis_url=REDIS_URL, prefix=prefix)
        reader.store.refresh_interval_s = 0.0  # replay the change log on every lookup: the racy path
        errors, seen = _hammer(reader, edits, writer)
        assert not errors, errors[:3]
        assert seen and seen <= {str(e.edit_id) for e in edits}
        reader.store.refresh()
        assert len(reader) == len(edits)
    finally:
        writer.store.drop()
