"""After a commit: make the version live and give its edits their terminal outcome.

Without a serving tier a committed version is live at once (its edits were recorded ``applied`` in the commit).
With one, the commit records them ``committed`` and a rollout task (``ensure_rolling``) rolls the *newest* committed
version out canary-first (``RolloutManager``), while the controller already computes the next batch on it: the
canary gates no longer add to every batch. When several versions wait, only the newest is rolled out (it holds the
earlier ones' edits); the earlier ones are marked ``superseded``.

* ``live``: the edits of every version up to it become ``applied``. Edits the worker's efficacy check found not
  taking (``VersionManifest.missed_edit_ids``) are ``applied`` with reason ``efficacy`` and stay in the retrieval
  tier; the others are retired from it.
* ``rolled_back``: the edits end ``rolled_back`` with the failed gate as reason, and so do the edits of every version
  committed on top of it meanwhile (they were computed on weights that will not be served); the head returns to the
  version the replicas still serve and the edit workers follow it, so the next batch is computed on the weights that
  are actually served (a batch computed on a discarded head fails to commit and is recomputed: ``HeadRevertedError``).
* ``skipped`` (no replica ready yet, e.g. engines still starting): the rollout is retried. At most
  ``rollout_max_pending_versions`` versions are ever between commit and live (the controller waits beyond that).

A controller restarted while versions were committed but not yet live resumes their rollout (head > live).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from controller.pipeline.pool import EditWorkerPool
from controller.pipeline.undo import clear_reverts
from controller.rollout.rolling import RolloutManager, probes_from_requests
from shared.metrics import Metrics
from shared.outcomes import EditOutcome, EditState, ReasonCode, Route
from shared.schemas import EditRequest
from shared.streams import EditStreams, Finished
from shared.weight_store import StoreError, VersionManifest, WeightStore

log = logging.getLogger("editq.publish")
COMPACTION_PROBES = 32  # live edits a compaction's canary checks


def count_routes(metrics: Metrics, finished: Sequence[Finished], recorded: int) -> None:
    """``editq_edits_routed_total``: edits by what serves them at their terminal outcome (weights or the tier)."""
    if recorded <= 0:
        return
    for route, n in Counter(f.outcome.served_by for f in finished if f.outcome.served_by is not None).items():
        metrics.inc("editq_edits_routed", min(n, recorded), route=route.value)


class Publisher:
    def __init__(
        self,
        streams: EditStreams,
        pool: EditWorkerPool,
        store: WeightStore,
        metrics: Metrics,
        rollout: RolloutManager | None = None,
        retire: Callable[[list[str]], Awaitable[int]] | None = None,
        retry_s: float = 2.0,
    ) -> None:
        self.streams = streams
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.rollout = rollout
        self.retire = retire  # removes live edits from the retrieval tier (None: no tier)
        self.retry_s = retry_s  # between rollout attempts of a version no replica could take yet
        self.pending: int | None = None  # a committed version whose last rollout attempt was skipped
        self._task: asyncio.Task | None = None

    @property
    def commit_state(self) -> EditState:
        """The state a commit records: terminal ``applied`` unless a rollout still has to make it live."""
        return EditState.committed if self.rollout is not None else EditState.applied

    # ---- the rollout task -------------------------------------------------------------------------------------
    @property
    def rolling(self) -> bool:
        return self._task is not None and not self._task.done()

    async def ensure_rolling(self) -> None:
        """Start the rollout task when a committed version is not live yet and none runs (after every commit, and
        periodically, so a restarted controller or a failed task resumes)."""
        if self.rollout is None or self.rolling:
            return
        if await self.streams.head() > await self.streams.live():
            self._task = asyncio.get_running_loop().create_task(self._roll())

    async def _roll(self) -> None:
        """Roll out the newest committed version until the live version is the head."""
        while True:
            try:
                outcome = await self.resume()
            except Exception as err:  # Redis or store trouble: retried by the next ensure_rolling
                log.warning("rollout failed: %s", err)
                return
            if outcome is None:
                return
            if outcome == "pending":
                await asyncio.sleep(self.retry_s)

    async def stop(self, grace_s: float = 60.0) -> None:
        """Let a running rollout finish (bounded), so no replica is left held mid-canary; then cancel it."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def resume(self) -> str | None:
        """One rollout attempt of the newest committed version the replicas do not serve yet (None: all live)."""
        if self.rollout is None:
            return None
        head, live = await self.streams.head(), await self.streams.live()
        if head <= live:
            self.pending = None
            return None
        manifest = self.store.manifest(head)
        requests = await self.streams.requests(manifest.edit_ids)
        ordered = [requests[e] for e in manifest.edit_ids if e in requests]
        probes = self.compaction_probes(manifest) if manifest.kind != "edit" else ()
        gone = await self.streams.requests(manifest.reverted_edit_ids)  # a revert: they must answer as before
        return await self.publish(head, ordered, manifest.missed_edit_ids, probes, list(gone.values()))

    def compaction_probes(self, manifest: VersionManifest, n: int = COMPACTION_PROBES) -> list[EditRequest]:
        """A compaction (or revert) writes no edits of its own but re-solves all of them: the canary probes the
        newest ``n`` live edits that took (their manifests hold the requests), never a reverted one."""
        out: dict[str, EditRequest] = {}  # by prompt text: only the newest edit of a prompt is live
        lost = set(manifest.missed_edit_ids)
        reverted = set(manifest.reverted_edit_ids)
        parent = manifest.parent
        while parent and len(out) < n:
            earlier = self.store.manifest(parent)
            reverted |= set(earlier.reverted_edit_ids)  # reverts come after the edits they take out
            skip = lost | reverted | set(earlier.missed_edit_ids)
            for r in reversed(earlier.edits):
                if len(out) < n and r.edit_id not in skip:
                    out.setdefault(r.text, r)
            parent = earlier.parent
        return list(out.values())

    # ---- one rollout --------------------------------------------------------------------------------------------
    async def publish(
        self, version: int, requests: Sequence[EditRequest], missed: Sequence[str] = (),
        extra_probes: Sequence[EditRequest] = (), reverted: Sequence[EditRequest] = (),
    ) -> str:
        """Make committed ``version`` live (or roll it back); returns ``live``, ``rolled_back`` or ``pending``.
        ``requests``/``missed``: its own edits and those that did not take (they stay in the retrieval tier); the
        edits of earlier versions that were never live are read from their manifests and decided with it.
        ``extra_probes``: edits the canary also checks (a compaction's sample of the live edits); ``reverted``:
        edits the version takes out, which the canary checks no longer answer their new target."""
        ids = [r.edit_id for r in requests]
        if self.rollout is None:
            taken = [e for e in ids if e not in set(missed)]
            await self.streams.set_live(version)
            await self.streams.set_version_status(version, "live")
            self.metrics.set("editq_live_version", version)
            await self._retire(taken)
            await self._follow(version)
            return "live"
        live = await self.streams.live()
        earlier = self.chain(self._parent(version), live)
        groups = [(m.version, m.edit_ids) for m in earlier] + [(version, ids)]  # each edit keeps its own version
        all_missed = {*missed, *(e for m in earlier for e in m.missed_edit_ids)}
        earlier_ids = [e for m in earlier for e in m.edit_ids]
        known = await self.streams.requests(earlier_ids)
        probed = [r for r in (*(known[e] for e in earlier_ids if e in known), *requests) if r.edit_id not in all_missed]
        # Probe only the edits that took on the worker: the canary must reproduce the update, and the edits the
        # efficacy check found weak are answered by the tier, not by these weights.
        probes = (probes_from_requests(probed, neighbours=True) + probes_from_requests(extra_probes)
                  + probes_from_requests(reverted, absent=True))
        result = await self.rollout.deploy(version, probes)
        if result.status == "live":
            recorded = 0
            for number, edit_ids in groups:
                recorded += await self._finish([e for e in edit_ids if e not in all_missed], EditState.applied, number)
                recorded += await self._finish_missed([e for e in edit_ids if e in all_missed], number)
            self.metrics.inc("editq_outcomes", recorded, state=EditState.applied.value)
            for manifest in earlier:
                await self.streams.set_version_status(manifest.version, "superseded")
            self.pending = None
            await self._retire([e for _, edit_ids in groups for e in edit_ids if e not in all_missed])
            return "live"
        if result.status == "rolled_back":
            await self._roll_back(version, groups, result.previous, result.reason)
            return "rolled_back"
        self.pending = version
        log.warning("version %d waits for its rollout: %s", version, result.reason)
        return "pending"

    async def _roll_back(
        self, version: int, groups: list[tuple[int, list[str]]], previous: int, reason: str | None
    ) -> None:
        """``version`` (with the never-live versions below it: ``groups`` of version and edit ids) failed a gate:
        their edits end rolled_back, and so do those of versions committed on top of it during the rollout; the
        head returns to ``previous``."""
        reason = reason or "rollout gate failed"
        recorded = 0
        for number, edit_ids in groups:
            recorded += await self._finish(edit_ids, EditState.rolled_back, number, ReasonCode.rollout,
                                           self.retrieval_note(reason))
        old_head = await self.streams.revert_head_to(previous)
        built_on = self.chain(old_head, version)  # committed on the refused version: never to be served
        for manifest in built_on:
            recorded += await self._finish(
                manifest.edit_ids, EditState.rolled_back, manifest.version, ReasonCode.rollout,
                self.retrieval_note(f"built on version {version}, which was rolled back ({reason})"),
            )
        # Rolled-back versions keep their numbers and files (history); only their status says they left the lineage.
        for number in sorted(({n for n, _ in groups} | {m.version for m in built_on}) - {version}):
            await self.streams.set_version_status(number, "rolled_back")
        for number in sorted({n for n, _ in groups} | {m.version for m in built_on}):  # reverts that did not hold
            with contextlib.suppress(StoreError):
                gone = self.store.manifest(number).reverted_edit_ids
                await clear_reverts(self.streams, gone, f"revert version {number} was rolled back ({reason})")
        self.metrics.inc("editq_outcomes", recorded, state=EditState.rolled_back.value)
        self.pending = None
        log.error("version %d rolled back (%s); head %d back to %d", version, reason, old_head, previous)
        await self._follow(previous)

    def _parent(self, version: int) -> int:
        try:
            return self.store.manifest(version).parent
        except StoreError:
            return version - 1  # a version without manifest (tests) sits on its predecessor

    def chain(self, top: int, floor: int) -> list[VersionManifest]:
        """Manifests of the versions above ``floor`` up to ``top`` along ``top``'s lineage, oldest first."""
        chain: list[VersionManifest] = []
        while top > floor:
            manifest = self.store.manifest(top)
            chain.append(manifest)
            top = manifest.parent
        return chain[::-1]

    @property
    def route_for_rest(self) -> Route | None:
        """Who serves an edit the weights did not take: the retrieval tier when there is one."""
        return Route.retrieval if self.retire is not None else None

    def missed_outcome(self, edit_id: str, version: int, stream_id: str | None = None) -> EditOutcome:
        """``applied`` (the version holds the update) but the edit did not take: the tier keeps answering it."""
        return EditOutcome(
            edit_id=edit_id, state=EditState.applied, version=version, reason_code=ReasonCode.efficacy,
            reason=self.retrieval_note("the update did not make this edit take on its own prompt (efficacy check)"),
            served_by=self.route_for_rest or Route.weights, stream_id=stream_id,
        )

    async def _finish_missed(self, edit_ids: Sequence[str], version: int) -> int:
        if not edit_ids:
            return 0
        finished = [Finished(self.missed_outcome(e, version), None) for e in edit_ids]
        recorded = await self.streams.finish(finished)
        count_routes(self.metrics, finished, recorded)
        return recorded

    def retrieval_note(self, reason: str) -> str:
        return f"{reason}; the retrieval tier keeps serving it" if self.retire is not None else reason

    async def _finish(
        self, edit_ids: Sequence[str], state: EditState, version: int, code: ReasonCode | None = None,
        reason: str | None = None,
    ) -> int:
        if not edit_ids:
            return 0
        served = Route.weights if state == EditState.applied else self.route_for_rest
        finished = [
            Finished(EditOutcome(edit_id=e, state=state, version=version, reason_code=code, reason=reason,
                                 served_by=served), None)
            for e in edit_ids
        ]
        recorded = await self.streams.finish(finished)
        count_routes(self.metrics, finished, recorded)
        return recorded

    async def _retire(self, edit_ids: list[str]) -> None:
        """Live in the weights: the tier entries go (a failure leaves them, harmless: they say the same)."""
        if self.retire is None:
            return
        try:
            await self.retire(edit_ids)
        except Exception as err:
            log.warning("could not retire %d tier entries: %s", len(edit_ids), err)

    async def _follow(self, version: int) -> None:
        """Edit workers move to the version; a failure here is repaired by the next batch's sync."""
        try:
            await self.pool.sync(version)
        except Exception as err:
            log.warning("edit workers not yet at version %d: %s", version, err)
