"""Outcomes for edits the weights do not take: verdicts (``rejected``: the collapse guard, the capacity budget) and
failures (``failed``: out of memory, or errors that persist for the edit alone). Each is one atomic outcome record
that also acknowledges the edit's stream entry; with a retrieval tier the outcome says the tier keeps serving it.
"""

from __future__ import annotations

import logging

from controller.pipeline.publish import Publisher, count_routes
from shared.metrics import Metrics
from shared.outcomes import EditOutcome, EditState, ReasonCode
from shared.settings import Settings
from shared.streams import EditStreams, Finished, StreamEntry
from shared.weight_store import StoreError, WeightStore
from workers.evaluation.budget_backoff import BudgetBackoff
from workers.guards import GuardRejection

log = logging.getLogger("editq.verdicts")


class StaleHeadError(RuntimeError):
    """The committed head moved while a batch was computed (another controller?): never commit on top of it."""


class HeadRevertedError(RuntimeError):
    """The version a batch was computed on was rolled back meanwhile: recompute the batch on the served head."""


class InfrastructureError(RuntimeError):
    """The store, Redis or a worker failed, not the edits: the batch goes back to the queue and waits (never a
    terminal outcome for an accepted edit)."""


def is_infrastructure(err: BaseException) -> bool:
    """A disk, store, connection or worker-process failure (Ray wraps a worker's exception: look at its cause)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from controller.pipeline.pool import WorkerDivergedError

    cause = getattr(err, "cause", None) or err
    if any(isinstance(e, TimeoutError | GetTimeoutError) for e in (err, cause)):
        return False  # a worker call that hangs may be the batch's fault (asyncio's TimeoutError is an OSError)
    kinds = (OSError, StoreError, RedisConnectionError, RedisTimeoutError, RayActorError, ActorDiedError,
             ActorUnavailableError, WorkerDivergedError)
    if isinstance(cause, kinds) or isinstance(err, kinds):
        return True
    transient = ("READONLY", "LOADING", "OOM", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
    return isinstance(cause, ResponseError) and str(cause).startswith(transient)


def retryable(err: BaseException) -> bool:
    """Transient failures are retried; OOM (same size fails again), guard verdicts and a moved head are not."""
    return not (is_out_of_memory(err) or isinstance(err, GuardRejection | StaleHeadError))


def describe(err: BaseException) -> str:
    """The root cause in one line (Ray wraps a worker's exception with its traceback; people need the cause)."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]


def is_out_of_memory(err: BaseException) -> bool:
    """OOM anywhere in the chain (Ray wraps worker exceptions): retrying the same size is pointless, split."""
    text = f"{type(err).__name__}: {err}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text


class Verdicts:
    def __init__(
        self, settings: Settings, streams: EditStreams, store: WeightStore, publisher: Publisher, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.backoff = BudgetBackoff(settings.health_patience if settings.health_budget else 0)

    async def weights_closed(self) -> tuple[ReasonCode, str] | None:
        """Why the next batch does not even try the weights (reason code, message), or None: the capacity budget is
        spent, or the health budget refused the last batches on this head (``BudgetBackoff``)."""
        spent = await self.capacity_spent()
        if spent:
            return ReasonCode.capacity, spent
        if not self.backoff.should_try(await self.streams.head()):
            return ReasonCode.health_budget, f"health budget spent: {self.backoff.describe()}"
        return None

    async def capacity_spent(self) -> str | None:
        """Why the weights take no more edits (the newest version's collapse metrics past the budget), or None."""
        s = self.settings
        if s.capacity_max_drift is None and s.capacity_min_control_accuracy is None:
            return None
        head = await self.streams.head()
        if head == 0:
            return None
        metrics = self.store.manifest(head).metrics
        drift = max((v for k, v in metrics.items() if k.startswith("editq_relative_drift_ratio|")), default=0.0)
        if s.capacity_max_drift is not None and drift > s.capacity_max_drift:
            return f"parametric capacity spent: drift {drift:.3f} > budget {s.capacity_max_drift:.3f} at v{head}"
        accuracy = metrics.get("editq_control_fact_accuracy_ratio")
        if s.capacity_min_control_accuracy is not None and accuracy is not None \
                and accuracy < s.capacity_min_control_accuracy:
            return (f"parametric capacity spent: control-fact accuracy {accuracy:.2f} < budget "
                    f"{s.capacity_min_control_accuracy:.2f} at v{head}")
        return None

    async def decline(self, entries: list[StreamEntry], code: ReasonCode, reason: str,
                       per_edit: dict[str, str] | None = None) -> None:
        """The weights do not take these edits (a verdict, not a failure): ``rejected`` with the reason."""
        finished = []
        for e in entries:
            text = self.publisher.retrieval_note(reason + (per_edit or {}).get(e.edit_id, ""))
            outcome = EditOutcome(edit_id=e.edit_id, state=EditState.rejected, reason_code=code, reason=text,
                                  stream_id=e.stream_id, served_by=self.publisher.route_for_rest)
            finished.append(Finished(outcome, e.stream_id))
        recorded = await self.streams.finish(finished)
        count_routes(self.metrics, finished, recorded)
        self.metrics.inc("editq_outcomes", recorded, state=EditState.rejected.value)
        log.warning("%d edits not written into the weights (%s)", len(entries), code.value)

    async def reject(self, entries: list[StreamEntry], rejection: GuardRejection) -> None:
        """A verdict of the worker on the whole batch: the collapse guard would weaken it so much that it fails, or
        the version would take the served model past its health budget. Rejected instead of applied."""
        if rejection.reason == ReasonCode.health_budget:
            self.backoff.refused(await self.streams.head())  # nothing was committed: the head is the batch's parent
            await self.decline(entries, ReasonCode.health_budget, f"health budget: {rejection.message}")
            return
        efficacy = dict(zip(rejection.edit_ids, rejection.per_edit_efficacy, strict=False))
        reason = (f"collapse guard: after filtering the update out of the protected spectral subspace the batch's "
                  f"efficacy is below {rejection.min_efficacy:.2f}")
        per_edit = {e.edit_id: f" (this edit: {efficacy.get(e.edit_id, 0.0):.2f})" for e in entries}
        await self.decline(entries, ReasonCode.collapse_risk, reason, per_edit)

    async def fail(self, entry: StreamEntry, error: BaseException | None, last_error: str | None) -> int:
        """The edit alone still failed: ``failed`` with the root cause (out of memory, or the worker's error)."""
        code = ReasonCode.out_of_memory if error and is_out_of_memory(error) else ReasonCode.worker_error
        tries = "" if code == ReasonCode.out_of_memory else f" after {self.settings.batch_retries + 1} attempts"
        reason = f"could not be applied alone{tries}: {describe(error) if error else last_error}"
        outcome = EditOutcome(
            edit_id=entry.edit_id, state=EditState.failed, reason_code=code,
            reason=self.publisher.retrieval_note(reason), stream_id=entry.stream_id,
            served_by=self.publisher.route_for_rest,
        )
        finished = [Finished(outcome, entry.stream_id)]
        recorded = await self.streams.finish(finished)
        count_routes(self.metrics, finished, recorded)
        self.metrics.inc("editq_outcomes", recorded, state=EditState.failed.value)
        return recorded
