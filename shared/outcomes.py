"""Edit lifecycle: the states an accepted edit passes through and the one terminal outcome it ends in.

Every accepted edit ends in exactly one terminal state, published once on the outcome stream: ``applied`` (with
the weight version that holds it), ``rejected`` (the guard or policy refused it, with the reason), ``failed`` (it
could not be applied after retries, or was dead-lettered) or ``rolled_back`` (its version failed the rollout).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class EditState(StrEnum):
    queued = "queued"  # accepted, in the edit stream
    in_flight = "in_flight"  # in a batch being computed
    committed = "committed"  # in a committed weight version that is being rolled out to the replicas
    applied = "applied"
    rejected = "rejected"
    failed = "failed"
    rolled_back = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({EditState.applied, EditState.rejected, EditState.failed, EditState.rolled_back})


class ReasonCode(StrEnum):
    """Machine-readable cause of a non-applied outcome (the ``reason`` text says it for people)."""

    invalid_payload = "invalid_payload"  # the stream entry does not hold a valid EditRequest
    max_deliveries = "max_deliveries"  # delivered too often without an outcome (poison entry)
    worker_error = "worker_error"  # the edit alone still failed after retries
    out_of_memory = "out_of_memory"
    collapse_risk = "collapse_risk"  # the spectral guard would weaken the edit too much
    capacity = "capacity"  # the parametric budget is spent
    health_budget = "health_budget"  # the version would take the served model past its health budget
    efficacy = "efficacy"  # the update did not make the edit take
    rollout = "rollout"  # the version failed a rollout gate


class Route(StrEnum):
    """What answers with the edit: the weights, or the retrieval tier (for edits the weights could not take)."""

    weights = "weights"
    retrieval = "retrieval"


class EditOutcome(BaseModel):
    """One terminal outcome, as published on the outcome stream."""

    model_config = ConfigDict(extra="forbid")

    edit_id: str
    state: EditState
    version: int | None = None
    reason_code: ReasonCode | None = None
    reason: str | None = None
    served_by: Route | None = None
    stream_id: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class EditStatus(BaseModel):
    """The per-edit record kept in Redis: where the edit is now, and how it ended."""

    model_config = ConfigDict(extra="ignore")

    edit_id: str
    state: EditState
    stream_id: str | None = None
    version: int | None = None
    reason_code: ReasonCode | None = None
    reason: str | None = None
    served_by: Route | None = None
    submitted_at: datetime | None = None
    updated_at: datetime | None = None
    reverted_in: int | None = Field(default=None, description="The version that took this edit out on demand.")
    reverted_by: str | None = None


class SubmitResult(BaseModel):
    """What the door answers: the edit's id and whether this call queued it or found it already known."""

    edit_id: str
    state: EditState
    duplicate: bool = False
    conflict: bool = Field(default=False, description="The id was known with other content (the door answers 409).")
    stream_id: str | None = None
