"""The commit step of a batch: edit on the workers -> delta in the store -> one atomic commit in Redis -> rollout.

A batch becomes one weight version: the leader worker solves it on the head, the delta is written to the store
(never over an existing version), then outcomes, the new head and the XACKs are recorded by one Lua script fenced by
the head the batch was computed on. Only edits still undecided are committed, so a retry after a commit whose reply
was lost never writes the same edits twice; any failure before the commit brings the workers back to the head.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from controller.pipeline.compaction import Compactor
from controller.pipeline.pool import EditWorkerPool
from controller.pipeline.publish import Publisher, count_routes
from controller.pipeline.verdicts import HeadRevertedError, StaleHeadError
from shared.metrics import Metrics
from shared.outcomes import EditOutcome, EditState, Route
from shared.streams import EditStreams, Finished, StreamEntry
from shared.weight_store import WeightStore, build_manifest

log = logging.getLogger("editq.controller")


class Committer:
    def __init__(
        self, streams: EditStreams, pool: EditWorkerPool, store: WeightStore, publisher: Publisher,
        compactor: Compactor, metrics: Metrics,
    ) -> None:
        self.streams, self.pool, self.store, self.publisher = streams, pool, store, publisher
        self.compactor, self.metrics = compactor, metrics
        self.counts = {"batches": 0, "applied": 0}

    async def undecided(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        """Entries whose edit is still queued or in flight (not committed in some version, not decided)."""
        statuses = await self.streams.statuses([e.edit_id for e in entries])
        waiting = (EditState.queued, EditState.in_flight)
        return [e for e in entries if (st := statuses[e.edit_id]) is not None and st.state in waiting]

    async def commit(self, entries: list[StreamEntry]) -> None:
        # A retry after a commit whose reply was lost (Redis timeout) must not write the same edits again.
        entries = await self.undecided(entries)
        if not entries:
            return
        requests = [e.request for e in entries]
        head = await self.streams.head()
        version = await self.streams.next_version(max(self.store.versions(), default=0))
        t0 = time.perf_counter()
        try:
            result = await self.pool.edit(head, version, requests)
        except BaseException:
            await self.resync(head)
            raise
        compute_s = time.perf_counter() - t0
        meta = self.pool.meta
        manifest = build_manifest(
            version, head, meta.base_model, result.edit_ids, meta.algo, result.deltas, result.checksums,
            hparams=meta.hparams,
            metrics={**result.metrics, **{f"seconds_{k}": v for k, v in result.seconds.items()}},
            missed_edit_ids=result.missed_edit_ids, reference=result.reference, edits=requests,
        )
        try:
            self.store.put(manifest, result.deltas, result.aux)
        except BaseException:  # the workers hold the uncommitted version: bring them back to the head
            await self.resync(head)
            raise
        state, missed = self.publisher.commit_state, set(result.missed_edit_ids)
        finished = [
            Finished(
                self.publisher.missed_outcome(e.edit_id, version, e.stream_id)
                if state == EditState.applied and e.edit_id in missed
                else EditOutcome(edit_id=e.edit_id, state=state, version=version, stream_id=e.stream_id,
                                 served_by=Route.weights if state == EditState.applied else None),
                e.stream_id,
            )
            for e in entries
        ]
        fields = {
            "status": "committed", "parent": head, "edits": len(entries), "created_at": manifest.created_at.isoformat()
        }
        recorded = await self.streams.finish(finished, expect_head=head, new_head=version, version_fields=fields)
        if recorded < 0:
            now = await self.streams.head()
            await self.resync(now)
            if now < head:  # our own rollout refused the version this batch was computed on: recompute it
                raise HeadRevertedError(f"version {head} was rolled back while version {version} was computed on it")
            raise StaleHeadError(f"head moved from {head} to {now} while version {version} was computed")
        self.counts["batches"] += 1
        self.counts["applied"] += recorded
        self.compactor.committed()
        if state == EditState.applied:
            self.metrics.inc("editq_outcomes", recorded, state=state.value)
            count_routes(self.metrics, finished, recorded)
        self.metrics.observe("editq_batch_duration_seconds", compute_s, stage="compute")
        self.metrics.observe("editq_delta_bytes", sum(d.nbytes for d in result.deltas))
        self.metrics.set("editq_weight_version", version)
        now = datetime.now(UTC)
        for e in entries:
            self.metrics.observe("editq_edit_latency_seconds", (now - e.request.created_at).total_seconds())
        log.info("committed version %d with %d edits in %.1f s", version, len(entries), compute_s)
        if missed:
            log.warning("version %d: %d of %d edits did not take on their own prompt", version, len(missed),
                        len(entries))
        try:  # failures after the commit never undo it: a pending rollout is resumed by the loop
            if self.publisher.rollout is None:
                await self.publisher.publish(version, requests, result.missed_edit_ids)
            else:  # rolled out beside the next batch's computation
                await self.publisher.ensure_rolling()
        except Exception as err:
            log.exception("publishing version %d failed: %s", version, err)

    async def resync(self, head: int) -> None:
        try:
            await self.pool.sync(head)
        except Exception as err:
            log.warning("could not resync workers to %d: %s", head, err)

