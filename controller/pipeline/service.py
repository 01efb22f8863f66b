"""The controller: reads the edit stream, forms batches, has the worker pool compute them, commits versions.

Run as one named Ray actor (``max_restarts=-1``, ``max_task_retries=-1``: when it dies Ray restarts it and re-runs
``run``). All state that matters lives in Redis and the weight store, so a restarted controller resumes: it
re-reads its own pending entries first, acknowledges those whose edits already have an outcome, and recomputes
the rest on workers synced back to the committed head. A batch commits as one atomic Redis script (outcomes, the
head pointer and the XACKs together), guarded by the head it was computed on, so no edit is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from controller.pipeline import operations
from controller.pipeline.batching import Batcher
from controller.pipeline.commit import Committer
from controller.pipeline.compaction import Compactor
from controller.pipeline.janitor import dead_letter_if_poison, sweep
from controller.pipeline.lease import ControllerLease
from controller.pipeline.pool import EditWorkerPool
from controller.pipeline.publish import Publisher
from controller.pipeline.undo import Undo
from controller.pipeline.verdicts import (
    InfrastructureError,
    StaleHeadError,
    Verdicts,
    describe,
    is_infrastructure,
    is_out_of_memory,
    retryable,
)
from shared.jobs import WorkerInfo
from shared.metrics import Metrics, default_metrics
from shared.outcomes import EditState, ReasonCode
from shared.settings import Settings
from shared.streams import EditStreams, StreamEntry
from shared.weight_store import LocalWeightStore
from workers.guards import GuardRejection

log = logging.getLogger("editq.controller")
CONSUMER = "controller"
LOOP_RETRY_S, LOOP_RETRY_MAX_S = 0.5, 30.0  # backoff of the consume loop after an infrastructure error
LOST_LEASE = "lost lease"


class ControllerStatus(BaseModel):
    state: str
    head: int
    live: int
    pending_in_batcher: int
    batches_committed: int
    edits_applied: int
    edits_failed: int
    dead_lettered: int
    started_at: datetime
    last_error: str | None = None
    workers: list[WorkerInfo] = []


class Controller:
    def __init__(self, settings: dict | None = None, metrics: Metrics | None = None) -> None:
        self.settings = Settings(**(settings or {}))
        s = self.settings
        self.streams = EditStreams.from_url(s.redis_url, s.namespace, s.stream_maxlen)
        self.store = LocalWeightStore(s.resolved_store_dir())
        self.pool = EditWorkerPool(s, self.store)
        self.batcher = Batcher(s.batch_max_size, s.batch_max_wait_s, s.batch_settle_s)
        self.metrics = metrics or (default_metrics())
        self.publisher = Publisher(self.streams, self.pool, self.store, self.metrics)
        self.verdicts = Verdicts(s, self.streams, self.store, self.publisher, self.metrics)
        self.compactor = Compactor(s, self.streams, self.pool, self.store, self.publisher, self.metrics)
        self.undo = Undo(self.streams, self.store, self.pool, self.compactor, self.publisher)
        self.lease = ControllerLease(self.streams.redis, s.namespace)
        self.committer = Committer(self.streams, self.pool, self.store, self.publisher, self.compactor, self.metrics)
        self.indexer = None  # the retrieval-tier indexer actor, when the tier is on
        self._stop = False
        self._state = "starting"
        self._started_at = datetime.now(UTC)
        self._counts = {"failed": 0, "dead": 0}
        self._in_flight: set[str] = set()
        self._last_sweep = 0.0
        self._last_error: str | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def run(self) -> ControllerStatus:
        """Consume until ``stop``; safe to call again after a crash (it resumes from Redis and the store). Waits in
        ``standby`` while another controller holds the namespace's lease."""
        self._stop = False
        if not await self._take_lease():
            return await self.status()
        beat = asyncio.create_task(operations.heartbeat_loop(
            self.streams, lambda: (self._state, self._last_error), self._still_leader))
        try:
            return await self._run()
        finally:
            beat.cancel()
            if self._state != LOST_LEASE:  # the new holder's heartbeat is the namespace's now
                with contextlib.suppress(Exception):
                    await operations.heartbeat(self.streams, self._state, self._last_error, ttl_s=60)
                with contextlib.suppress(Exception):
                    await self.lease.release()

    async def _take_lease(self) -> bool:
        """Hold the namespace's controller lease before touching anything (False: stopped while waiting)."""

        def standby(holder: str | None) -> None:
            log.warning("another controller (%s) runs namespace %s: standing by until it stops", holder,
                        self.settings.namespace)
            self._state = "standby"

        taken = await self.lease.wait(lambda: self._stop, standby)
        if taken and self._state == "standby":
            log.warning("controller lease taken over: resuming the namespace")
            self._state = "starting"
        return taken

    async def _still_leader(self) -> bool:
        if await self.lease.renew():
            return True
        if self._state != LOST_LEASE:
            log.error("controller lease lost to %s: stopping (no batch is taken from here on)",
                      await self.lease.current())
            self._state, self._stop = LOST_LEASE, True
        return False

    async def _run(self) -> ControllerStatus:
        try:
            await self._start()
        except Exception as err:
            self._last_error, self._state = describe(err), "failed"
            raise
        self._state = "running"
        delay = LOOP_RETRY_S
        while not self._stop:
            try:
                await self._step()
                delay = LOOP_RETRY_S
            except StaleHeadError as err:
                self._last_error = str(err)
                log.error("%s: stopping", err)
                self._state = "stale"
                break
            except Exception as err:  # Redis unreachable, the stream deleted: report and retry, never die silently
                self._last_error = describe(err)
                self._state = "retrying"
                log.exception("controller step failed, retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(LOOP_RETRY_MAX_S, delay * 2)
                with contextlib.suppress(Exception):
                    await self.streams.recover(err)
        await self.publisher.stop()
        if self._state in ("running", "waiting for replicas", "paused", "waiting to undo"):
            self._state = "stopped"
        return await self.status()

    async def stop(self) -> None:
        self._stop = True
        if self.indexer is not None:
            await self.indexer.stop.remote()

    async def stop_serving(self) -> None:
        """Shut the (detached) serving replicas down; they otherwise outlive the controller on purpose."""
        if self.publisher.rollout is not None:
            from controller.rollout.router import stop_replicas

            await stop_replicas(self.publisher.rollout.clients)

    async def kill_worker(self, index: int) -> None:
        """Kill one edit worker (fault drills and tests); Ray restarts it and the next batch re-syncs it."""
        self.pool.kill(index)

    async def status(self) -> ControllerStatus:
        """Counters and the workers as of their last sync (never waits for a busy worker)."""
        return ControllerStatus(
            state=self._state, head=await self.streams.head(), live=await self.streams.live(),
            pending_in_batcher=len(self.batcher), batches_committed=self.committer.counts["batches"],
            edits_applied=self.committer.counts["applied"], edits_failed=self._counts["failed"],
            dead_lettered=self._counts["dead"], started_at=self._started_at, last_error=self._last_error,
            workers=self.pool.last_infos,
        )

    async def _start(self) -> None:
        s = self.settings
        await operations.check_redis_state(self.streams, self.store)  # before anything reads head 0 as the truth
        await self.streams.ensure_group()
        await operations.record_settings(self.streams, s)
        if s.serving_replicas > 0:
            from controller.rollout.rolling import RolloutManager
            from controller.rollout.router import spawn_replicas

            # Before the workers, never after them: preparing a worker can take minutes on a fresh machine, and
            # each replica starts its engine and catches up to the live version on its own meanwhile (actor
            # creation does not wait for either). Detached and named: replicas keep serving across controller
            # restarts; these find them again. Set early, ``stop_serving`` reaches them even mid-start.
            self.publisher.rollout = RolloutManager(spawn_replicas(s), s, self.streams, self.metrics)
        if s.retrieval_enabled:  # the tier must see edits within a second, whatever the workers do
            await self._start_indexer()
        await self.pool.start()
        head = await self.streams.head()
        await self.pool.sync(head)
        if s.serving_replicas == 0 and await self.streams.live() != head:  # no serving tier: the head is live
            await self.streams.set_live(head)
        pending = await self.streams.read(CONSUMER, count=100_000, block_ms=None, own_pending=True)
        if pending:
            log.warning("resuming %d entries delivered before a restart", len(pending))
        pending = await self._poison_check(pending)
        await self._admit(pending)

    async def _start_indexer(self) -> None:
        import ray

        from controller.pipeline.indexer import RetrievalIndexer

        self.indexer = ray.remote(RetrievalIndexer).options(
            num_cpus=0, max_restarts=-1, max_task_retries=-1
        ).remote(self.settings.model_dump(mode="json"))
        if await self.indexer.enabled_.remote():
            self._indexer_run = self.indexer.run.remote()

            async def retire(edit_ids: list[str]) -> int:
                return await self.indexer.retire.remote(edit_ids)

            async def restore(requests: list) -> int:
                return await self.indexer.add.remote(requests)

            self.publisher.retire = retire
            self.compactor.restore = restore
            self.undo.restore, self.undo.retire = restore, retire
        else:
            log.warning("retrieval tier off (no checkpoint for this model): edits are served by the weights only")

    async def _poison_check(self, entries: list[StreamEntry]) -> list[StreamEntry]:
        kept = await dead_letter_if_poison(self.streams, entries, self.settings.max_deliveries)
        self._count_dead(len(entries) - len(kept))
        return kept

    def _count_dead(self, n: int, reason: str = ReasonCode.max_deliveries.value) -> None:
        if n:
            self._counts["dead"] += n
            self.metrics.inc("editq_dead_letters", n, reason=reason)

    # ---- the loop ---------------------------------------------------------------------------------------------
    async def _step(self) -> None:
        s = self.settings
        if self.publisher.rollout is not None and await self._rollout_waiting():
            return
        if await self.undo.pending():  # an operator's revert or rollback goes first (also while paused)
            if await self.undo.due():
                await self.undo.run()
            else:  # no new batch meanwhile: the rollouts in flight finish, then the undo runs alone
                self._state = "waiting to undo"
                await self.publisher.ensure_rolling()
                await asyncio.sleep(0.5)
            return
        if await operations.paused(self.streams):  # an operator stopped intake: edits wait in the queue
            self._state = "paused"
            await asyncio.sleep(0.5)
            return
        self._state = "running"
        due = self.batcher.seconds_until_due()
        if len(self.batcher) < 2 * s.batch_max_size and due != 0.0:
            block_s = 1.0 if due is None else min(1.0, due)
            entries = await self.streams.read(CONSUMER, s.batch_max_size, max(1, int(block_s * 1000)))
            await self._admit(entries)
        batch = self.batcher.take()
        if batch:
            await self._process(batch)
        elif why := await self.compactor.due():  # between batches (one that becomes due meanwhile waits)
            await self.compactor.run(why)
        if time.monotonic() - self._last_sweep > s.janitor_interval_s:
            self._last_sweep = time.monotonic()
            await self._sweep()
            if self.publisher.rollout is not None:
                await self.publisher.rollout.reconcile()
            if s.edit_stream_retention_s is not None:
                trimmed = await self.streams.trim_processed(s.edit_stream_retention_s)
                if trimmed:
                    log.info("trimmed %d processed edit-stream entries (retention %.0f s)", trimmed,
                             s.edit_stream_retention_s)
            depth = await self.streams.queue_depth()
            self.metrics.set("editq_queue_lag_entries", depth["lag"])
            self.metrics.set("editq_queue_pending_entries", depth["pending"])

    async def _rollout_waiting(self) -> bool:
        """True while too many committed versions wait for their rollout (then no new batch starts).

        The rollout of the newest version runs beside the next batch's computation (``Publisher.ensure_rolling``),
        so the canary gates do not add to every batch; the bound keeps the served weights from falling far behind
        the head when replicas are slow or down.
        """
        await self.publisher.ensure_rolling()
        behind = len(self.publisher.chain(await self.streams.head(), await self.streams.live()))
        if behind < self.settings.rollout_max_pending_versions:
            return False
        self._state = "waiting for replicas"
        await asyncio.sleep(0.5)
        return True

    async def _sweep(self) -> None:
        def held(sid: str) -> bool:
            return sid in self._in_flight or self.batcher.holds(sid)

        claimed, dead = await sweep(
            self.streams, CONSUMER, int(self.settings.claim_idle_s * 1000), self.settings.max_deliveries, held
        )
        self._count_dead(dead)
        await self._admit(claimed)

    async def _admit(self, entries: Sequence[StreamEntry]) -> None:
        """Dead-letter unreadable entries, acknowledge ones already decided or duplicated, batch the rest."""
        good: list[StreamEntry] = []
        for entry in entries:
            if entry.request is None:
                log.error("dead-lettering %s: %s", entry.stream_id, entry.error)
                await self.streams.dead_letter(entry, ReasonCode.invalid_payload, entry.error or "unreadable", None)
                self._count_dead(1, ReasonCode.invalid_payload.value)
            else:
                good.append(entry)
        if not good:
            return
        statuses = await self.streams.statuses([e.edit_id for e in good])
        done, fresh = [], []
        for entry in good:
            st = statuses[entry.edit_id]
            if st is not None and (st.state.terminal or (st.stream_id and st.stream_id != entry.stream_id)):
                done.append(entry.stream_id)  # decided already, or a second entry for a known edit id
            else:
                fresh.append(entry)
        if done:
            await self.streams.ack(done)
        self.batcher.add(fresh)

    async def _process(self, batch: list[StreamEntry]) -> None:
        statuses = await self.streams.statuses([e.edit_id for e in batch])
        decided = [e.stream_id for e in batch if (st := statuses[e.edit_id]) is not None and st.state.terminal]
        if decided:
            await self.streams.ack(decided)
        batch = [e for e in batch if e.stream_id not in decided]
        if not batch:
            return
        self._in_flight = {e.stream_id for e in batch}
        try:
            await self.streams.mark_in_flight([e.edit_id for e in batch])
            self.metrics.observe("editq_batch_size_edits", len(batch))
            closed = await self.verdicts.weights_closed()
            if closed:
                await self.verdicts.decline(batch, *closed)
            else:
                await self._apply(batch)
        except InfrastructureError as err:
            # What is still undecided goes back to the front of the queue, its edits back to `queued` (part of a
            # split batch may have committed meanwhile: never again); the loop backs off and retries it. The
            # stream entries stay pending under this consumer, so nothing is re-delivered.
            try:
                undecided = await self.committer.undecided(batch)
            except Exception:  # Redis itself is down: keep the whole batch (a commit is fenced and idempotent)
                undecided = batch
            self.batcher.put_back(undecided)
            with contextlib.suppress(Exception):
                await self.streams.mark([e.edit_id for e in undecided], EditState.in_flight, EditState.queued)
            log.warning("%d edits wait: infrastructure failure (%s)", len(undecided), err)
            raise
        finally:
            self._in_flight = set()

    async def _apply(self, entries: list[StreamEntry]) -> None:
        """Commit ``entries`` as one version; retry with backoff, then split to isolate what keeps failing."""
        s = self.settings
        error: BaseException | None = None
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(s.batch_retries + 1),
                wait=wait_exponential(multiplier=s.retry_backoff_s, max=30),
                retry=retry_if_exception(retryable),
                reraise=True,
            ):
                with attempt:
                    await self.committer.commit(entries)
            return
        except StaleHeadError:
            raise
        except GuardRejection as rejection:  # a verdict on the whole batch: neither retried nor split
            await self.verdicts.reject(entries, rejection)
            return
        except Exception as err:
            if is_infrastructure(err) and not is_out_of_memory(err):  # not the edits' fault: never split or fail
                self.metrics.inc("editq_batch_failures", reason="infrastructure")
                raise InfrastructureError(describe(err)) from err
            error = err
            self._last_error = describe(err)
            reason = "out_of_memory" if is_out_of_memory(err) else "worker_error"
            self.metrics.inc("editq_batch_failures", reason=reason)
            log.warning("batch of %d failed (%s)", len(entries), self._last_error)
        if len(entries) > 1:
            mid = len(entries) // 2
            await self._apply(entries[:mid])
            await self._apply(entries[mid:])
            return
        if await self.verdicts.fail(entries[0], error, self._last_error):
            self._counts["failed"] += 1
