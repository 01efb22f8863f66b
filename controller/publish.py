"""After a commit: make the version live and give its edits their terminal outcome.

Without a serving tier a committed version is live at once (its edits were recorded ``applied`` in the commit).
With one, the commit records them ``committed`` and the version is rolled out canary-first (``RolloutManager``):

* ``live``: the edits become ``applied``; edit workers follow the version. Edits the worker's efficacy check found
  not taking (``VersionManifest.missed_edit_ids``) are ``applied`` with reason ``efficacy`` and stay in the
  retrieval tier; the others are retired from it.
* ``rolled_back``: the edits end ``rolled_back`` with the failed gate as reason, and the head returns to the
  version the replicas still serve, so the next batch is computed on the weights that are actually served.
* ``skipped`` (no replica ready yet, e.g. engines still starting): the rollout is retried; no new batch starts
  while a version waits, so at most one version is ever between commit and live.

A controller restarted while a version was committed but not yet live resumes its rollout (head > live).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from controller.pool import EditWorkerPool
from controller.rollout import RolloutManager, probes_from_requests
from shared.metrics import Metrics
from shared.outcomes import EditOutcome, EditState, ReasonCode, Route
from shared.schemas import EditRequest
from shared.streams import EditStreams, Finished
from shared.weight_store import WeightStore

log = logging.getLogger("editq.publish")


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
    ) -> None:
        self.streams = streams
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.rollout = rollout
        self.retire = retire  # removes live edits from the retrieval tier (None: no tier)
        self.pending: int | None = None  # a committed version still waiting for its rollout

    @property
    def commit_state(self) -> EditState:
        """The state a commit records: terminal ``applied`` unless a rollout still has to make it live."""
        return EditState.committed if self.rollout is not None else EditState.applied

    async def publish(self, version: int, requests: Sequence[EditRequest], missed: Sequence[str] = ()) -> str:
        """Make a just-committed version live (or roll it back); returns ``live``, ``rolled_back`` or ``pending``.
        ``missed``: edits of the version that did not take (they stay in the retrieval tier)."""
        ids = [r.edit_id for r in requests]
        taken = [e for e in ids if e not in set(missed)]
        if self.rollout is None:
            await self.streams.set_live(version)
            await self.streams.set_version_status(version, "live")
            self.metrics.set("editq_live_version", version)
            await self._retire(taken)
            await self._follow(version)
            return "live"
        # Probe only the edits that took on the worker: the canary must reproduce the update, and the edits the
        # efficacy check found weak are answered by the tier, not by these weights.
        result = await self.rollout.deploy(version, probes_from_requests([r for r in requests if r.edit_id in taken]))
        if result.status == "live":
            recorded = await self._finish(taken, EditState.applied, version)
            if missed:
                recorded += await self._finish_missed(missed, version)
            self.metrics.inc("editq_outcomes", recorded, state=EditState.applied.value)
            self.pending = None
            await self._retire(taken)
            await self._follow(version)
            return "live"
        if result.status == "rolled_back":
            recorded = await self._finish(ids, EditState.rolled_back, version, ReasonCode.rollout,
                                          self.retrieval_note(result.reason or "rollout gate failed"))
            self.metrics.inc("editq_outcomes", recorded, state=EditState.rolled_back.value)
            await self.streams.revert_head(version, result.previous)
            self.pending = None
            log.error("version %d rolled back (%s); head back to %d", version, result.reason, result.previous)
            await self._follow(result.previous)
            return "rolled_back"
        self.pending = version
        log.warning("version %d waits for its rollout: %s", version, result.reason)
        return "pending"

    async def resume(self) -> str | None:
        """Roll out a committed head the replicas do not serve yet (after a restart, or a skipped rollout)."""
        if self.rollout is None:
            return None
        head, live = await self.streams.head(), await self.streams.live()
        if head <= live:
            self.pending = None
            return None
        manifest = self.store.manifest(head)
        requests = await self.streams.requests(manifest.edit_ids)
        ordered = [requests[e] for e in manifest.edit_ids if e in requests]
        return await self.publish(head, ordered, manifest.missed_edit_ids)

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
