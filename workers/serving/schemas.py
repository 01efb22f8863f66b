"""Payloads of the Ray calls to a replica and of its answers (pydantic: the controller, the router and the HTTP
API may run other builds than the replica, and should fail loudly instead of misreading each other)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most top candidates one token may report


class ReplicaState(StrEnum):
    starting = "starting"  # engine loading, or catching up to the live version: takes no traffic
    ready = "ready"
    swapping = "swapping"  # draining / reloading weights: takes no traffic
    canary = "canary"  # swapped and held out of traffic while a rollout probes it (only internal requests)
    failed = "failed"  # weights in an unknown state or engine dead: restart it (it rejoins at the live version)
    draining = "draining"  # finishing its requests before a planned restart (an upgrade): takes no new traffic


class ReplicaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    settings: dict = Field(description="A dump of ServingSettings.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class GenerateRequest(BaseModel):
    """One completion: a plain prompt, or chat messages rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = Field(default=0, ge=-1, description="0 or -1: no top-k cut.")
    min_p: float = Field(default=0.0, ge=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="Log-probabilities of each sampled token and of this many top tokens.")
    min_version: int | None = Field(default=None, ge=0)
    request_id: str | None = None
    internal: bool = Field(default=False, description="A rollout probe: admitted while the replica is a held canary.")
    retrieval: bool = Field(default=True, description="Let the retrieval tier answer with edits it holds.")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """One generated token with its log-probability and the engine's candidates at that step, in vLLM's order
    (the sampled token first, then the top tokens by rank); the API shapes it as OpenAI's completions or chat
    ``logprobs``."""

    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class RetrievedEdit(BaseModel):
    """The retrieval-tier entry put in front of this request (RECIPE): the best hit, plus any further edits above
    the sentinel whose statements went in too (``EDITQ_RETRIEVAL_TOP_K`` > 1, text or hybrid injection)."""

    edit_id: str
    score: float
    sentinel_score: float
    also: list[str] = Field(default_factory=list, description="Further edits whose statements were put in front.")


class GenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    version: int = Field(description="Weight version that produced every token of this response.")
    replica: str
    engine_versions: list[str] = Field(
        default_factory=list, description="vLLM's own weight-version spans over the output tokens (one expected)."
    )
    retrieved: RetrievedEdit | None = Field(default=None, description="The tier entry used, if any.")
    logprobs: list[TokenLogprob] | None = Field(default=None, description="Per token, when the request asked.")


class StreamChunk(BaseModel):
    """One piece of a streamed completion; the first chunk already carries the version (fixed at admission)."""

    text: str
    finish_reason: str | None = None
    version: int
    replica: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retrieved: RetrievedEdit | None = None
    logprobs: list[TokenLogprob] | None = None


class ScoreRequest(BaseModel):
    """Mean log-probability of each candidate continuation (`` candidate``) after ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    candidates: list[str] = Field(min_length=1)


class ScoreResult(BaseModel):
    mean_logprobs: list[float]
    version: int
    replica: str


class ProbeComparison(BaseModel):
    """One probe: where the served continuation first leaves the reference's, and how close the choice was."""

    name: str
    verdict: Literal["agree", "near_tie", "disagree"]
    position: int | None = Field(default=None, description="Index of the first differing generated token.")
    reference_gap: float | None = Field(default=None, description="Reference top-1 minus top-2 logit there.")
    served_gap: float | None = Field(default=None, description="The served engine's own top-2 log-prob gap there.")
    tolerance: float | None = None
    prompt: str = ""
    reference_text: str = ""
    served_text: str = ""


class AgreementReport(BaseModel):
    """The check of one replica at one version. ``checked`` False: no reference answers were stored for it."""

    version: int
    ok: bool
    checked: bool = True
    probes: int = 0
    near_ties: list[ProbeComparison] = Field(default_factory=list)
    disagreements: list[ProbeComparison] = Field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def summary(self) -> str:
        """One line for logs and gate details, naming each disagreeing prompt and both answers."""
        if not self.checked:
            return f"version {self.version}: no reference answers stored, agreement not checked"
        if self.error:
            return f"version {self.version}: agreement check failed to run: {self.error}"
        head = (f"version {self.version}: {self.probes - len(self.disagreements)}/{self.probes} probes agree with "
                f"the reference ({len(self.near_ties)} near ties)")
        if self.disagreements:
            head += ", disagreeing: " + ", ".join(c.name for c in self.disagreements)
        parts = [head]
        for c in self.disagreements:
            parts.append(f"DISAGREE {c.name} at token {c.position} (reference gap {c.reference_gap:.4g}): prompt "
                         f"{c.prompt!r} -> served {c.served_text!r}, reference {c.reference_text!r}")
        for c in self.near_ties:
            served = "n/a" if c.served_gap is None else f"{c.served_gap:.3g}"
            parts.append(f"near tie {c.name} at token {c.position} (reference gap {c.reference_gap:.3g} <= "
                         f"{c.tolerance:.3g}, served gap {served})")
        return "; ".join(parts)


class SwapReport(BaseModel):
    """What one swap did and how long generation was paused; ``ok`` False means the replica is back on
    ``from_version`` (or ``failed`` when even that could not be restored)."""

    replica: str
    from_version: int | None
    to_version: int
    ok: bool
    noop: bool = False
    drain: Literal["wait", "abort", "none"] = "none"
    pause_s: float = 0.0
    materialise_s: float = 0.0
    reload_s: float = 0.0
    total_s: float = 0.0
    matrices: int = 0
    bytes_loaded: int = 0
    checksums_ok: bool = False
    max_probe_error: float | None = None
    min_probe_separation: float | None = None
    agreement: AgreementReport | None = Field(
        default=None, description="The served-vs-reference check at the target (None when the swap failed before)."
    )
    error: str | None = None


class ReplicaStatus(BaseModel):
    name: str
    state: ReplicaState
    version: int | None
    incarnation: str = Field(description="Changes when the actor restarts.")
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    mixed_versions: int = Field(default=0, description="Responses whose tokens came from two versions (never >0).")
    swaps: int = 0
    last_swap: SwapReport | None = None
    agreement: AgreementReport | None = Field(default=None, description="The latest served-vs-reference check.")
    error: str | None = None
    tier_lookups: int = Field(default=0, description="Queries looked up in the retrieval tier by this incarnation.")
    tier_hits: int = Field(default=0, description="Of those, queries a stored edit was put in front of.")

    @property
    def serving(self) -> bool:
        return self.state == ReplicaState.ready


class ControlFact(BaseModel):
    """A fact the model knows and every version must keep."""

    prompt: str
    answer: str


class EditProbe(BaseModel):
    """A prompt that must answer ``target_new`` after the version that holds its edit."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = Field(default=None, description="Control facts about this subject are not judged.")
    neighbours: list[ControlFact] = Field(
        default_factory=list, description="The client's neighbourhood prompts: answers the edit must not change.",
    )
    absent: bool = Field(default=False, description="A reverted edit: the prompt must no longer answer target_new.")


class ReplicaUnavailableError(RuntimeError):
    """The replica takes no traffic now (starting, swapping, failed): route the request elsewhere."""


class RequestAbortedError(RuntimeError):
    """A swap had to abort this in-flight request (drain timeout): it produced nothing usable; retry it."""


class MixedVersionError(RuntimeError):
    """vLLM reports tokens of one response from two weight versions: a bug, never served."""
