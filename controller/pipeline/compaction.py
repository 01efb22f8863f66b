"""Compaction in the pipeline: when due, re-solve all live edits jointly on the base weights as one new version.

Due every ``EDITQ_COMPACT_EVERY_VERSIONS`` committed edit versions (counted by this controller since its start or
its last compaction) and whenever someone asked for it (``editq compact`` sets a request key in Redis), but only
while every committed version is live: a compaction then rolls out alone, so a failed canary rolls back the
compaction and nothing else. It runs between batches (a batch that becomes due meanwhile waits for it) and commits
like a batch: fenced by the head it was computed on, no edits of its own, the workers' health budget first, then the
normal gated rollout. A compaction the worker refuses (edits it would lose, the health budget) changes nothing: it is
logged, counted and not retried until the next one is due. Edits a permitted compaction no longer makes take
(``EDITQ_COMPACT_MAX_LOST`` > 0) are put back into the retrieval tier at its commit, so nothing goes unserved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from controller.pipeline.verdicts import StaleHeadError
from shared.audit import AuditAction, AuditEntry
from shared.metrics import Metrics
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.streams import EditStreams
from shared.weight_store import StoreError, WeightStore, build_manifest
from workers.editing.compaction import COMPACTABLE_ALGOS, CompactionRefused
from workers.guards import GuardRejection

if TYPE_CHECKING:
    from controller.pipeline.pool import EditWorkerPool
    from controller.pipeline.publish import Publisher

log = logging.getLogger("editq.compaction")
REFUSALS = (CompactionRefused, GuardRejection, StoreError, ValueError)


def request_key(namespace: str) -> str:
    return "{" + namespace + "}:compact_requested"


async def request_compaction(streams: EditStreams, requested_by: str) -> None:
    """Ask the running controller to compact at its next step (``editq compact``)."""
    await streams.redis.set(request_key(streams.namespace), f"{requested_by} {time.time():.0f}")
    await streams.audit.append(AuditEntry(action=AuditAction.compaction_requested, principal=requested_by))


class Compactor:
    def __init__(
        self, settings: Settings, streams: EditStreams, pool: EditWorkerPool, store: WeightStore,
        publisher: Publisher, metrics: Metrics,
    ) -> None:
        self.every = settings.compact_every_versions
        self.max_lost = settings.compact_max_lost
        self.streams, self.pool, self.store, self.publisher, self.metrics = streams, pool, store, publisher, metrics
        self.versions_since = 0  # edit versions committed since start or the last compaction attempt
        self.last_refusal: str | None = None  # why the last compaction or revert was refused
        # Puts edits back into the retrieval tier (None: no tier); set by the controller with the indexer.
        self.restore: Callable[[list[EditRequest]], Awaitable[object]] | None = None

    def committed(self) -> None:
        self.versions_since += 1

    async def due(self) -> str | None:
        """Why a compaction should run now (``requested`` / ``periodic``), or None."""
        requested = await self.streams.redis.exists(request_key(self.streams.namespace))
        if not requested and (self.every is None or self.versions_since < self.every):
            return None
        meta = self.pool.meta
        if meta is not None and meta.algo not in COMPACTABLE_ALGOS:
            await self.streams.redis.delete(request_key(self.streams.namespace))
            self.versions_since = 0
            log.warning("compaction skipped: %s is not one of %s", meta.algo, ", ".join(COMPACTABLE_ALGOS))
            return None
        if await self.streams.head() != await self.streams.live():
            return None  # wait until every committed version is live: the compaction must roll out alone
        await self.streams.redis.delete(request_key(self.streams.namespace))
        return "requested" if requested else "periodic"

    async def run(self, why: str, exclude: Sequence[str] = ()) -> int | None:
        """One compaction of the head (with ``exclude``: a revert that takes those edits out of the weights); the
        committed version number, or None when refused."""
        kind = "revert" if exclude else "compaction"
        self.versions_since = 0
        head = await self.streams.head()
        version = await self.streams.next_version(max(self.store.versions(), default=0))
        started = time.perf_counter()
        try:
            result = await self.pool.compact(head, version, self.max_lost, exclude)
        except REFUSALS as err:
            self.metrics.inc("editq_compactions", outcome="refused")
            log.warning("%s (%s) of version %d refused: %s", kind, why, head, err)
            self.last_refusal = str(err)
            await self._resync(head)
            return None
        except BaseException:
            await self._resync(head)
            raise
        meta = self.pool.meta
        manifest = build_manifest(
            version, head, meta.base_model, [], meta.algo, result.deltas, result.checksums, hparams=meta.hparams,
            metrics={**result.metrics, **{f"seconds_{k}": v for k, v in result.seconds.items()}},
            missed_edit_ids=result.missed_edit_ids, reference=result.reference, kind=kind,
            reverted_edit_ids=list(exclude),
        )
        try:
            self.store.put(manifest, result.deltas, result.aux)
        except BaseException:  # the workers hold the uncommitted version: bring them back to the head
            await self._resync(head)
            raise
        fields = {"status": "committed", "parent": head, "edits": 0, "kind": kind,
                  "created_at": manifest.created_at.isoformat()}
        if await self.streams.finish([], expect_head=head, new_head=version, version_fields=fields) < 0:
            now = await self.streams.head()
            await self._resync(now)
            if now < head:  # our own rollout refused a version meanwhile: drop this compaction, run on
                log.warning("compaction %d dropped: version %d was rolled back meanwhile", version, head)
                return None
            raise StaleHeadError(f"head moved from {head} to {now} while compaction {version} was computed")
        self.metrics.inc("editq_compactions", outcome="committed")
        self.metrics.set("editq_weight_version", version)
        log.info("compaction (%s): version %d re-solves %d live edits (%.1f s)", why, version,
                 int(result.metrics.get("compaction_edits", 0)), time.perf_counter() - started)
        try:  # failures after the commit never undo it (as for a batch)
            if result.missed_edit_ids and self.restore is not None:
                lost = await self.streams.requests(result.missed_edit_ids)
                await self.restore(list(lost.values()))
                log.warning("compaction %d: %d edits no longer take in the weights; back in the retrieval tier",
                            version, len(lost))
            if self.publisher.rollout is None:
                await self.publisher.publish(version, [])
            else:
                await self.publisher.ensure_rolling()
        except Exception as err:
            log.exception("publishing compaction %d failed: %s", version, err)
        return version

    async def _resync(self, head: int) -> None:
        try:
            await self.pool.sync(head)
        except Exception as err:
            log.warning("could not resync workers to %d: %s", head, err)
