"""The retrieval-tier indexer: every accepted edit reaches the RECIPE tier within a second of its submission.

A second consumer group (``retrieval``) on the same edit stream, read by its own Ray actor, so a long weight update
never delays it: the tier answers with an edit long before the weights hold it, and keeps answering for the edits
the weights cannot take. Entries are retired once their weight version is live (the controller calls ``retire``).
Unreadable entries are acknowledged here and dead-lettered by the controller, which reads the same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shared.metrics import Metrics, default_metrics
from shared.outcomes import EditState
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.streams import RETRIEVAL_GROUP, EditStreams
from workers.retrieval.tier import RetrievalTier

log = logging.getLogger("editq.indexer")
CONSUMER = "indexer"
RETRY_S, RETRY_MAX_S = 0.5, 30.0


class RetrievalIndexer:
    def __init__(self, settings: dict, metrics: Metrics | None = None) -> None:
        self.settings = Settings(**settings)
        self.tier = RetrievalTier.for_model(self.settings)
        self.streams = EditStreams.from_url(self.settings.redis_url, self.settings.namespace)
        self.metrics = metrics or (default_metrics())
        self._stop = False
        self.indexed = 0
        self.last_index_seconds = 0.0

    def enabled_(self) -> bool:
        """Whether a tier was loaded (a checkpoint trained for this model exists and the tier is enabled)."""
        return self.tier is not None

    async def run(self) -> int:
        """Index until ``stop``: own pending entries first (after a restart), then new ones. Returns the count."""
        if self.tier is None:
            return 0
        self._stop = False
        await self.streams.ensure_group(RETRIEVAL_GROUP)
        pending, delay = True, RETRY_S
        while not self._stop:
            try:
                entries = await self.streams.read(
                    CONSUMER, 256, None if pending else 500, own_pending=pending, group=RETRIEVAL_GROUP
                )
                if pending and not entries:
                    pending = False
                    continue
                if entries:
                    await self._index(entries)
                delay = RETRY_S
            except Exception as err:  # Redis unreachable, the stream deleted: retry, never die silently
                log.exception("indexing failed, retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                pending = True  # unacknowledged entries of the failed read come back first
                with contextlib.suppress(Exception):
                    await self.streams.recover(err, RETRIEVAL_GROUP)
        return self.indexed

    async def _index(self, entries) -> None:
        good = [e for e in entries if e.request is not None]
        statuses = await self.streams.statuses([e.edit_id for e in good]) if good else {}
        # An edit whose version is already live needs no entry (the controller retired it, or it beat us).
        fresh = [e.request for e in good if not ((st := statuses[e.edit_id]) and st.state == EditState.applied)]
        start = time.perf_counter()
        if fresh:
            await asyncio.to_thread(self.tier.add_many, fresh)
        self.last_index_seconds = time.perf_counter() - start
        await self.streams.ack([e.stream_id for e in entries], group=RETRIEVAL_GROUP)
        self.indexed += len(fresh)
        if fresh:
            self.metrics.set("editq_retrieval_entries", len(self.tier))

    async def add(self, requests: list[EditRequest]) -> int:
        """Put edits (back) into the tier, e.g. those a compaction no longer makes take; returns how many."""
        if self.tier is None or not requests:
            return 0
        await asyncio.to_thread(self.tier.add_many, requests)
        self.metrics.set("editq_retrieval_entries", len(self.tier))
        return len(requests)

    async def retire(self, edit_ids: list[str]) -> int:
        """Remove edits whose weight version is live; returns how many were in the tier."""
        if self.tier is None:
            return 0
        retired = sum([await asyncio.to_thread(self.tier.retire, e) for e in edit_ids])
        self.metrics.set("editq_retrieval_entries", len(self.tier))
        return retired

    async def size(self) -> int:
        return len(self.tier) if self.tier is not None else 0

    async def stop(self) -> None:
        self._stop = True

