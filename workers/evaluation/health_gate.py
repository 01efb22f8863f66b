"""The health budget: every candidate weight version is scored before it may be committed, and one that would take
the served model past the budget is refused (``GuardRejection``, reason ``health_budget``; its edits stay in the
retrieval tier).

Why a budget instead of an alert: sequential editing degrades a model gradually (canary perplexity 16.8 -> 45 after
2,000 AlphaEdit edits on SmolLM2, benchmarks/README.md) and no single batch looks alarming. Scoring every version
against the *base* model (never against the previous version, which would let damage accumulate in small steps)
bounds the total damage whatever the stream does.

The gate uses a cheap slice of the general measures (``workers.evaluation.general``): KL to the base model and top-1
agreement on the first ``health_tokens`` positions of the mixed text, retention of ``health_facts`` facts the base
model knows (facts about subjects edited in this lineage are dropped: they are meant to change), canary perplexity,
and optionally fluency. Each limit is optional; the base model's own values are measured once (cached with the KL
reference) so the perplexity and retention limits are relative to what this model scored unedited.

The fact check is a sample, so it guards against its own sampling error twice. Each check draws its facts afresh
from the firmly known ones (seeded by the batch, so a retry of one batch sees the same facts): with a fixed sample, a
stream of tries admits the versions that happen to spare those facts and damage piles up on the others (measured:
versions reading 0.953-0.961 at a fixed 128-fact gate kept 0.91-0.93 of the facts it never saw). And the floor is
compared with a one-sided Wilson lower bound of the reading (``retention_confidence``), not the reading itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.metrics import metric_key
from shared.settings import Settings
from workers.evaluation.collapse import canary_perplexity
from workers.evaluation.general import (
    FLUENCY_PROMPTS,
    GeneralBudget,
    GeneralHealth,
    GeneralProbe,
    RetentionFact,
    fact_retention,
    general_health,
    kl_and_agreement,
    load_or_compute_reference,
    load_retention_facts,
    reference_path,
    without_subjects,
)
from workers.evaluation.scoring import answer_margins
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
    retention_confidence: float | None = None

    def retention_bound(self, retention: float, n_facts: int | None) -> float:
        """The value the retention floor is checked against: the one-sided lower confidence bound of a reading on
        ``n_facts`` facts (Wilson score interval), or the reading itself without a confidence or a fact count."""
        if self.retention_confidence is None or not n_facts or math.isnan(retention):
            return retention
        return wilson_lower_bound(retention, n_facts, self.retention_confidence)

    def breaches(self, health: GeneralHealth, base: GeneralHealth, n_facts: int | None = None) -> list[str]:
        """Why ``health`` is past the budget (empty when it is within); nan readings never breach. ``n_facts``: how
        many facts the retention reading scored (for its confidence bound)."""
        out = []
        if self.max_kl is not None and health.kl > self.max_kl:
            out.append(f"KL to base {health.kl:.4f} > {self.max_kl:.4f}")
        if self.max_ppl_ratio is not None and health.ppl > base.ppl * self.max_ppl_ratio:
            out.append(f"perplexity {health.ppl:.2f} > {self.max_ppl_ratio:.2f} x base {base.ppl:.2f}")
        bound = self.retention_bound(health.retention, n_facts)
        if self.min_retention is not None and bound < self.min_retention * base.retention:
            reading = f"fact retention {health.retention:.3f}"
            if bound != health.retention:
                reading += f" (lower {self.retention_confidence:.0%} bound {bound:.3f} on {n_facts} facts)"
            out.append(f"{reading} < {self.min_retention:.2f} x base {base.retention:.3f}")
        if self.min_top1_agreement is not None and health.top1_agreement < self.min_top1_agreement:
            out.append(f"top-1 agreement {health.top1_agreement:.3f} < {self.min_top1_agreement:.3f}")
        if self.min_fluency_ratio is not None and health.fluency < self.min_fluency_ratio * base.fluency:
            out.append(f"fluency {health.fluency:.2f} < {self.min_fluency_ratio:.2f} x base {base.fluency:.2f}")
        return out


def wilson_lower_bound(share: float, n: int, confidence: float) -> float:
    """One-sided lower bound of a binomial share observed on ``n`` trials (Wilson score): at confidence 0.9, a model
    whose true retention is below the bound reads this high about one time in ten (Wilson is approximate: 10-13% for
    100-420 facts at a 0.95 floor)."""
    z = NormalDist().inv_cdf(confidence)
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def health_metrics(health: GeneralHealth) -> dict[str, float]:
    """The reading as flat manifest keys (the names Prometheus exports, ``shared.metrics``)."""
    pairs = {
        "editq_general_kl": health.kl, "editq_top1_agreement_ratio": health.top1_agreement,
        "editq_fact_retention_ratio": health.retention, "editq_canary_perplexity": health.ppl,
        "editq_fluency_entropy": health.fluency,
    }
    return {metric_key(name): value for name, value in pairs.items() if not math.isnan(value)}


class HealthGate:
    """Scores the model as it is now against the base model it was built on (construct it on the unedited model).

    The facts scored are those the base model knows by at least ``min_margin`` nats (every answer token's log-prob
    over the best other token's; measured once on the base model and cached with its reading): a fact the base only
    just knows flips under any small change, so counting it measures fragility, not damage. ``rotate``: each check
    draws ``budget.max_facts`` of them afresh (the base reading is then on all of them) instead of scoring a fixed
    prefix. ``facts`` replaces the shipped facts."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: HealthLimits,
        budget: GeneralBudget, cache_dir: Path, fingerprint: str, model_name: str | None, rotate: bool = False,
        facts: Sequence[RetentionFact] | None = None, min_margin: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.budget = budget
        self.rotate = rotate
        self.min_margin = min_margin
        self.probe = GeneralProbe.from_asset(tokenizer, budget.max_tokens)
        self.reference = load_or_compute_reference(model, tokenizer, self.probe, cache_dir, fingerprint)
        self.known = list(facts) if facts is not None else load_retention_facts(model_name)
        self.pool: list[RetentionFact] = []
        self.facts: list[RetentionFact] = []
        self.prompts = FLUENCY_PROMPTS[: budget.n_prompts]
        self.base = self._base_health(model, reference_path(cache_dir, fingerprint, self.probe).with_suffix(".json"))

    @property
    def base_facts(self) -> list[RetentionFact]:
        """The facts the base reading scored: every fact a check may draw."""
        return self.pool if self.rotate else self.facts

    def _base_key(self) -> dict[str, object]:
        return base_key(self.known, self.budget, self.min_margin, self.rotate)

    @staticmethod
    def cached(
        tokenizer: PreTrainedTokenizerBase, budget: GeneralBudget, cache_dir: Path, fingerprint: str,
        model_name: str | None = None, rotate: bool = False, min_margin: float = 0.0,
    ) -> bool:
        """Whether a gate for this model, budget and fact draw would find its base reading cached (no base model
        needed): the KL reference and a base reading taken on the same facts, margin and prompts."""
        probe = GeneralProbe.from_asset(tokenizer, budget.max_tokens)
        path = reference_path(cache_dir, fingerprint, probe)
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            return False
        key = base_key(load_retention_facts(model_name), budget, min_margin, rotate)
        cached = _read_json(path.with_suffix(".json"))
        return cached is not None and cached.get("key") == key

    def _keep_firm(self, margins: Sequence[float]) -> None:
        self.pool = [f for f, m in zip(self.known, margins, strict=True) if m > 0 and m >= self.min_margin]
        self.facts = self.pool[: self.budget.max_facts] if self.budget.max_facts is not None else self.pool

    def _base_health(self, model: PreTrainedModel, path: Path) -> GeneralHealth:
        key = self._base_key()
        cached = _read_json(path)
        if cached is not None and cached.get("key") == key:
            self._keep_firm(cached["margins"])
            return GeneralHealth(**cached["health"])
        pairs = [(f.prompt, f.answer) for f in self.known]
        margins = answer_margins(model, self.tokenizer, pairs).tolist() if pairs else []
        self._keep_firm(margins)
        log.info("health gate: %d of %d known facts have a base margin of >= %.2f nats", len(self.pool),
                 len(self.known), self.min_margin)
        if self.known and not self.pool:
            log.warning("health gate: no known fact has a base margin of %.2f nats: the retention limit is off "
                        "(lower EDITQ_HEALTH_FACT_MARGIN)", self.min_margin)
        base = self.score(model, self.base_facts)
        partial = path.with_suffix(".json.partial")  # a reader never sees half a file
        partial.write_text(json.dumps({"key": key, "health": asdict(base), "margins": margins}))
        partial.replace(path)
        return base

    def sample(self, edited_subjects: Iterable[str], seed: str = "") -> list[RetentionFact]:
        """The facts one check scores: none about an edited subject; with ``rotate`` a uniform draw of
        ``budget.max_facts`` from the firm pool, the same for the same ``seed``."""
        subjects = set(edited_subjects)
        if not self.rotate:
            return without_subjects(self.facts, subjects)
        eligible = without_subjects(self.pool, subjects)
        n = len(eligible) if self.budget.max_facts is None else min(self.budget.max_facts, len(eligible))
        rng = random.Random(hashlib.sha256(seed.encode()).digest())
        return [eligible[i] for i in sorted(rng.sample(range(len(eligible)), n))]

    def score(self, model: PreTrainedModel, facts: Sequence[RetentionFact]) -> GeneralHealth:
        """The measures on the model as it is, retention on exactly ``facts``."""
        if self.prompts:
            return general_health(model, self.tokenizer, self.probe, self.reference, facts, (),
                                  GeneralBudget(self.budget.max_tokens, None, len(self.prompts),
                                                self.budget.max_new_tokens), self.prompts)
        kl, agreement = kl_and_agreement(model, self.tokenizer, self.probe, self.reference)
        return GeneralHealth(
            kl=kl, top1_agreement=agreement, retention=fact_retention(model, self.tokenizer, facts),
            ppl=canary_perplexity(model, self.tokenizer), fluency=float("nan"),
        )

    def check(
        self, model: PreTrainedModel, edited_subjects: Iterable[str], edit_ids: Sequence[str] = ()
    ) -> GeneralHealth:
        """Score the candidate; raise ``GuardRejection`` (reason ``health_budget``) when it breaks the budget. The
        facts are drawn by the batch's ``edit_ids`` (by the edited subjects when there are none: a compaction)."""
        subjects = set(edited_subjects)
        facts = self.sample(subjects, "\n".join(sorted(edit_ids) or sorted(subjects)))
        health = self.score(model, facts)
        breaches = self.limits.breaches(health, self.base, len(facts))
        if breaches:
            raise GuardRejection(
                "the version would take the served model past its health budget: " + "; ".join(breaches),
                [], edit_ids, reason=HEALTH_BUDGET,
            )
        return health


def _read_json(path: Path) -> dict | None:
    """A cached base reading, or None when it is missing or unreadable (then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def base_key(
    facts: Sequence[RetentionFact], budget: GeneralBudget, min_margin: float, rotate: bool
) -> dict[str, object]:
    """What a cached base reading was taken on: all known facts (hashed), the margin and draw that select the scored
    ones, the fluency prompts and their length."""
    digest = hashlib.sha256(json.dumps([(f.prompt, f.answer) for f in facts]).encode()).hexdigest()[:16]
    return {"facts": digest, "min_margin": min_margin, "draw": "all" if rotate else budget.max_facts,
            "prompts": list(FLUENCY_PROMPTS[: budget.n_prompts]), "new_tokens": budget.max_new_tokens}


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
        settings.health_min_top1_agreement, settings.health_min_fluency_ratio, settings.health_retention_confidence,
    )
    return HealthGate(model, tokenizer, limits, settings_budget(settings), settings.general_dir, fingerprint,
                      model_name, rotate=settings.health_facts_rotate, min_margin=settings.health_fact_margin)
