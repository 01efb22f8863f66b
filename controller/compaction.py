"""Compaction in the pipeline: when due, re-solve all live edits jointly on the base weights as one new version.

Due every ``EDITQ_COMPACT_EVERY_VERSIONS`` committed edit versions (counted by this controller since its start or
its last compaction) and whenever someone asked for it (``editq compact`` sets a request key in Redis). The new
version commits like a batch (fenced by the head it was computed on, no edits of its own) and goes through the
normal gated rollout; the workers' health budget scores it first. A compaction the worker refuses (edits it would
lose, the health budget) changes nothing: it is logged, counted and not retried until the next one is due.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from shared.metrics import Metrics
from shared.settings import Settings
from shared.streams import EditStreams
from shared.weight_store import StoreError, WeightStore, build_manifest
from workers.editing.compaction import CompactionRefused
from workers.guards import GuardRejection

if TYPE_CHECKING:
    from controller.pool import EditWorkerPool
    from controller.publish import Publisher

log = logging.getLogger("editq.compaction")


def request_key(namespace: str) -> str:
    return "{" + namespace + "}:compact_requested"


async def request_compaction(streams: EditStreams, requested_by: str) -> None:
    """Ask the running controller to compact at its next step (``editq compact``)."""
    await streams.redis.set(request_key(streams.namespace), f"{requested_by} {time.time():.0f}")


class Compactor:
    def __init__(
        self, settings: Settings, streams: EditStreams, pool: EditWorkerPool, store: WeightStore,
        publisher: Publisher, metrics: Metrics,
    ) -> None:
        self.every = settings.compact_every_versions
        self.max_lost = settings.compact_max_lost
        self.streams, self.pool, self.store, self.publisher, self.metrics = streams, pool, store, publisher, metrics
        self.versions_since = 0  # edit versions committed since start or the last compaction attempt

    def committed(self) -> None:
        self.versions_since += 1

    async def due(self) -> str | None:
        """Why a compaction should run now (``requested`` / ``periodic``), or None."""
        if await self.streams.redis.getdel(request_key(self.streams.namespace)) is not None:
            return "requested"
        if self.every is not None and self.versions_since >= self.every:
            return "periodic"
        return None

    async def run(self, why: str) -> int | None:
        """One compaction of the head; the committed version number, or None when refused or stale."""
        self.versions_since = 0
        head = await self.streams.head()
        version = head + 1
        started = time.perf_counter()
        try:
            result = await self.pool.compact(head, version, self.max_lost)
        except (CompactionRefused, GuardRejection, StoreError, ValueError) as err:
            self.metrics.inc("editq_compactions", outcome="refused")
            log.warning("compaction (%s) of version %d refused: %s", why, head, err)
            await self.pool.sync(head)
            return None
        meta = self.pool.meta
        manifest = build_manifest(
            version, head, meta.base_model, [], meta.algo, result.deltas, result.checksums, hparams=meta.hparams,
            metrics={**result.metrics, **{f"seconds_{k}": v for k, v in result.seconds.items()}},
            reference=result.reference, kind="compaction",
        )
        self.store.put(manifest, result.deltas, result.aux)
        fields = {"status": "committed", "parent": head, "edits": 0, "kind": "compaction",
                  "created_at": manifest.created_at.isoformat()}
        if await self.streams.finish([], expect_head=head, new_head=version, version_fields=fields) < 0:
            log.warning("compaction of version %d not committed: the head moved meanwhile", head)
            await self.pool.sync(await self.streams.head())
            return None
        self.metrics.inc("editq_compactions", outcome="committed")
        self.metrics.set("editq_weight_version", version)
        log.info("compaction (%s): version %d re-solves %d live edits (%.1f s)", why, version,
                 int(result.metrics.get("compaction_edits", 0)), time.perf_counter() - started)
        if self.publisher.rollout is None:
            await self.publisher.publish(version, [])
        else:
            await self.publisher.ensure_rolling()
        return version
