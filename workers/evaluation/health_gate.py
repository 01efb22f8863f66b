"""The health budget: every candidate weight version is scored before it may be committed, and one that would take
the served model past the budget is refused (``GuardRejection``, reason ``health_budget``; its edits stay in the
retrieval tier).

Why a budget instead of an alert: sequential editing degrades a model gradually (canary perplexity 16.8 -> 45 after
2,000 AlphaEdit edits on SmolLM2, benchmarks/README.md) and no single batch looks alarming. Scoring every version
against the *base* model (never against the previous version, which would let damage accumulate in small steps)
bounds the total damage whatever the stream does.

The gate uses a cheap slice of the general measures (``workers.evaluation.general``): KL to the base model and top-1
agreement on the first ``health_tokens`` positions of the mixed text, retention of the first ``health_facts`` facts the
base model knows (facts about subjects edited in this lineage are dropped: they are meant to change), canary
perplexity, and optionally fluency. Each limit is optional; the base model's own values are measured once (cached
with the KL reference) so the perplexity and retention limits are relative to what this model scored unedited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.metrics import metric_key
from shared.settings import Settings
from workers.evaluation.collapse import canary_perplexity
from workers.evaluation.general import (
    FLUENCY_PROMPTS,
    GeneralBudget,
    GeneralHealth,
    GeneralProbe,
    fact_retention,
    general_health,
    kl_and_agreement,
    load_or_compute_reference,
    load_retention_facts,
    reference_path,
)
from workers.guards.policy import GuardRejection

log = logging.getLogger("editq.health")

HEALTH_BUDGET = "health_budget"


@dataclass(frozen=True)
class HealthLimits:
    """The budget, relative to the base model. ``None`` switches a limit off."""

    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_retention: float | None = None
    min_top1_agreement: float | None = None
    min_fluency_ratio: float | None = None

    def breaches(self, health: GeneralHealth, base: GeneralHealth) -> list[str]:
        """Why ``health`` is past the budget (empty when it is within); nan readings never breach."""
        out = []
        if self.max_kl is not None and health.kl > self.max_kl:
            out.append(f"KL to base {health.kl:.4f} > {self.max_kl:.4f}")
        if self.max_ppl_ratio is not None and health.ppl > base.ppl * self.max_ppl_ratio:
            out.append(f"perplexity {health.ppl:.2f} > {self.max_ppl_ratio:.2f} x base {base.ppl:.2f}")
        if self.min_retention is not None and health.retention < self.min_retention * base.retention:
            out.append(f"fact retention {health.retention:.3f} < {self.min_retention:.2f} x base {base.retention:.3f}")
        if self.min_top1_agreement is not None and health.top1_agreement < self.min_top1_agreement:
            out.append(f"top-1 agreement {health.top1_agreement:.3f} < {self.min_top1_agreement:.3f}")
        if self.min_fluency_ratio is not None and health.fluency < self.min_fluency_ratio * base.fluency:
            out.append(f"fluency {health.fluency:.2f} < {self.min_fluency_ratio:.2f} x base {base.fluency:.2f}")
        return out


def health_metrics(health: GeneralHealth) -> dict[str, float]:
    """The reading as flat manifest keys (the names Prometheus exports, ``shared.metrics``)."""
    pairs = {
        "editq_general_kl": health.kl, "editq_top1_agreement_ratio": health.top1_agreement,
        "editq_fact_retention_ratio": health.retention, "editq_canary_perplexity": health.ppl,
        "editq_fluency_entropy": health.fluency,
    }
    return {metric_key(name): value for name, value in pairs.items() if not math.isnan(value)}


class HealthGate:
    """Scores the model as it is now against the base model it was built on (construct it on the unedited model)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: HealthLimits,
        budget: GeneralBudget, cache_dir: Path, fingerprint: str, model_name: str | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.budget = budget
        self.probe = GeneralProbe.from_asset(tokenizer, budget.max_tokens)
        self.reference = load_or_compute_reference(model, tokenizer, self.probe, cache_dir, fingerprint)
        facts = load_retention_facts(model_name)
        self.facts = facts[: budget.max_facts] if budget.max_facts is not None else facts
        self.prompts = FLUENCY_PROMPTS[: budget.n_prompts]
        self.base = self._base_health(model, reference_path(cache_dir, fingerprint, self.probe).with_suffix(".json"))

    def _base_key(self) -> dict[str, object]:
        facts = hashlib.sha256(json.dumps([(f.prompt, f.answer) for f in self.facts]).encode()).hexdigest()[:16]
        return {"facts": facts, "prompts": list(self.prompts), "new_tokens": self.budget.max_new_tokens}

    @staticmethod
    def cached(tokenizer: PreTrainedTokenizerBase, budget: GeneralBudget, cache_dir: Path, fingerprint: str) -> bool:
        """Whether a gate for this model and budget would find its base reference cached (no base model needed)."""
        probe = GeneralProbe.from_asset(tokenizer, budget.max_tokens)
        return reference_path(cache_dir, fingerprint, probe).is_file() and \
            reference_path(cache_dir, fingerprint, probe).with_suffix(".json").is_file()

    def _base_health(self, model: PreTrainedModel, path: Path) -> GeneralHealth:
        key = self._base_key()
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return GeneralHealth(**cached["health"])
        base = self.score(model, ())
        path.write_text(json.dumps({"key": key, "health": asdict(base)}))
        return base

    def score(self, model: PreTrainedModel, edited_subjects: Iterable[str]) -> GeneralHealth:
        if self.prompts:
            return general_health(model, self.tokenizer, self.probe, self.reference, self.facts, edited_subjects,
                                  self.budget, self.prompts)
        kl, agreement = kl_and_agreement(model, self.tokenizer, self.probe, self.reference)
        return GeneralHealth(
            kl=kl, top1_agreement=agreement,
            retention=fact_retention(model, self.tokenizer, self.facts, edited_subjects),
            ppl=canary_perplexity(model, self.tokenizer), fluency=float("nan"),
        )

    def check(
        self, model: PreTrainedModel, edited_subjects: Iterable[str], edit_ids: Sequence[str] = ()
    ) -> GeneralHealth:
        """Score the candidate; raise ``GuardRejection`` (reason ``health_budget``) when it breaks the budget."""
        health = self.score(model, edited_subjects)
        breaches = self.limits.breaches(health, self.base)
        if breaches:
            raise GuardRejection(
                "the version would take the served model past its health budget: " + "; ".join(breaches),
                [], edit_ids, reason=HEALTH_BUDGET,
            )
        return health


def settings_budget(settings: Settings) -> GeneralBudget:
    """The per-version slice of the measures the deployment scores (``EDITQ_HEALTH_TOKENS`` etc.)."""
    return GeneralBudget(max_tokens=settings.health_tokens, max_facts=settings.health_facts,
                         n_prompts=settings.health_fluency_prompts, max_new_tokens=32)


def gate_from_settings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, fingerprint: str,
    model_name: str | None,
) -> HealthGate | None:
    """The deployment's gate (``EDITQ_HEALTH_*``), or None when the budget is off. ``model`` must be unedited."""
    if not settings.health_budget:
        return None
    limits = HealthLimits(
        settings.health_max_kl, settings.health_max_ppl_ratio, settings.health_min_retention,
        settings.health_min_top1_agreement, settings.health_min_fluency_ratio,
    )
    return HealthGate(model, tokenizer, limits, settings_budget(settings), settings.general_dir, fingerprint,
                      model_name)
