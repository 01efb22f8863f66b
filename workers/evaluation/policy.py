"""The deployment's edit policy outside the pipeline, for ``editq eval``: health budget, efficacy route, tier.

What the pipeline does per batch, in one process: the candidate passes the health budget (``EDITQ_HEALTH_*``) or
its edits go to the retrieval tier (reason ``health_budget``, or the guard's); of an applied batch, the edits that
do not take on their own prompt stay in the tier too (the worker's efficacy check). Scoring then treats every edit
as it would be served: every query goes through the tier (retrieval over all tier-held edits, the deployment's
injection) on the current model, exactly as a replica answers it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.schemas import EditRequest
from shared.settings import Settings
from workers.editing.editor import Editor
from workers.editing.results import BatchResult
from workers.evaluation.health_gate import HealthGate, gate_from_settings
from workers.evaluation.metrics import EditMetrics, edit_metrics
from workers.guards import GuardRejection
from workers.guards.policy import edit_success
from workers.retrieval.served_scoring import TierScorer, load_tier_scorer


@dataclass
class Served:
    """Metrics of every edit as served, and where each edit is served from."""

    metrics: EditMetrics
    weights_share: float
    tier_share: float
    routed: dict[str, int]  # edits the weights do not serve, by reason
    tier_scored: bool
    tier_detail: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights_share": self.weights_share, "tier_share": self.tier_share,
            "policy": {"routed": self.routed, "tier_scored": self.tier_scored, "tier_detail": self.tier_detail},
        }


@dataclass
class ServingPolicy:
    gate: HealthGate | None
    tier: TierScorer | None
    efficacy_check: bool = True
    in_weights: list[EditRequest] = field(default_factory=list)
    in_tier: list[EditRequest] = field(default_factory=list)
    routed: Counter = field(default_factory=Counter)

    @classmethod
    def from_settings(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, fingerprint: str,
        model_path: Path,
    ) -> ServingPolicy:
        """The deployment's policy; ``model`` must still be unedited (the budget is relative to it)."""
        gate = gate_from_settings(model, tokenizer, settings, fingerprint, Path(model_path).name)
        tier = load_tier_scorer(settings, fingerprint) if settings.retrieval_enabled else None
        return cls(gate, tier, settings.efficacy_check)

    def _to_tier(self, batch: Sequence[EditRequest], reason: str) -> None:
        self.in_tier.extend(batch)
        self.routed[reason] += len(batch)
        if self.tier is not None:
            self.tier.add(batch)

    def apply(self, editor: Editor, batch: Sequence[EditRequest]) -> BatchResult | None:
        """One batch as the pipeline would take it; None when the whole batch went to the tier."""
        subjects = {r.subject for r in (*self.in_weights, *batch)}
        ids = [str(r.edit_id or r.content_key()) for r in batch]
        gate = self.gate
        accept = None if gate is None else (lambda model: gate.check(model, subjects, ids))
        try:
            result = editor.apply(batch, accept=accept)
        except GuardRejection as refusal:
            self._to_tier(batch, refusal.reason)
            return None
        if self.efficacy_check:
            took = edit_success(editor.model, editor.tokenizer, batch).tolist()
            missed = [r for r, ok in zip(batch, took, strict=True) if ok < 0.5]
            if missed:
                self._to_tier(missed, "efficacy")
            batch = [r for r, ok in zip(batch, took, strict=True) if ok >= 0.5]
        self.in_weights.extend(batch)
        return result

    def served(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], zsre: bool
    ) -> Served:
        n = len(requests)
        routed = dict(self.routed)
        if self.tier is None or zsre:  # no tier to score with (or zsRE's token metric): the model alone
            metrics, detail = edit_metrics(model, tokenizer, requests, zsre), None
        else:
            detail = self.tier.score(model, tokenizer, requests)
            metrics = EditMetrics(detail["efficacy"], detail["generalization"], detail["specificity"])
        tier_n = len({id(r) for r in self.in_tier})
        return Served(
            metrics, (n - tier_n) / n if n else math.nan, tier_n / n if n else math.nan, routed,
            self.tier is not None and not zsre, detail,
        )
