"""The health budget: the limits' arithmetic, the gate on a tiny model (the base passes, an edited model past a
limit is refused with reason ``health_budget``), the editor leaves model and state exactly as before a refused batch,
and through the running pipeline a refused version never goes live: its edits end ``rejected/health_budget``; once
the budget refused a few batches in a row, later ones skip the weights (the back-off) until the head changes."""

from __future__ import annotations

import math

import pytest
import torch

from shared.settings import Settings
from tests.pipeline_helpers import Probe, pipeline_settings, tiny_requests
from tests.test_guards import REQUESTS, _hp, _same, _snapshot, stats  # noqa: F401 (fixture)
from tests.test_pipeline import run_to_terminal
from workers.editing.editor import Editor
from workers.evaluation import health_gate
from workers.evaluation.budget_backoff import BudgetBackoff
from workers.evaluation.general import (
    GeneralBudget,
    GeneralHealth,
    RetentionFact,
)
from workers.evaluation.health_gate import (
    HEALTH_BUDGET,
    HealthGate,
    HealthLimits,
    gate_from_settings,
    health_metrics,
    wilson_lower_bound,
)
from workers.evaluation.scoring import answer_margins, token_accuracy
from workers.guards import GuardRejection

BASE = GeneralHealth(kl=0.0, top1_agreement=1.0, retention=0.9, ppl=20.0, fluency=5.0)


def test_limits_are_relative_to_the_base_and_each_names_its_measure() -> None:
    limits = HealthLimits(max_kl=0.05, max_ppl_ratio=1.10, min_retention=0.95, min_top1_agreement=0.9,
                          min_fluency_ratio=0.8)
    within = GeneralHealth(kl=0.05, top1_agreement=0.9, retention=0.9 * 0.95, ppl=22.0, fluency=4.0)
    assert limits.breaches(within, BASE) == []  # every limit is inclusive
    past = GeneralHealth(kl=0.06, top1_agreement=0.89, retention=0.85, ppl=22.1, fluency=3.9)
    breaches = limits.breaches(past, BASE)
    assert [b.split()[0] for b in breaches] == ["KL", "perplexity", "fact", "top-1", "fluency"]
    assert "22.10 > 1.10 x base 20.00" in breaches[1]
    assert HealthLimits().breaches(past, BASE) == []  # no limits, no breach
    # a measure that cannot be taken (no known facts for this model: nan) never breaches
    unknown = GeneralHealth(kl=0.0, top1_agreement=1.0, retention=math.nan, ppl=20.0, fluency=math.nan)
    assert limits.breaches(unknown, BASE) == []
    assert set(health_metrics(unknown)) == {"editq_general_kl", "editq_top1_agreement_ratio",
                                            "editq_canary_perplexity"}


def test_the_retention_bound_admits_a_model_at_the_floor_about_as_rarely_as_its_confidence_says() -> None:
    # exact binomial: a model whose true retention is exactly the floor passes when its reading's bound clears it
    for n, confidence in [(128, 0.9), (256, 0.9), (256, 0.95), (620, 0.8)]:
        passes = sum(math.comb(n, k) * 0.95**k * 0.05 ** (n - k) for k in range(n + 1)
                     if wilson_lower_bound(k / n, n, confidence) >= 0.95)
        assert passes <= (1 - confidence) * 1.25, (n, confidence, passes)
        # the reading alone would pass it about half the time
        point = sum(math.comb(n, k) * 0.95**k * 0.05 ** (n - k) for k in range(n + 1) if k / n >= 0.95)
        assert point > 0.45
    assert wilson_lower_bound(1.0, 256, 0.9) == pytest.approx(256 / (256 + 1.2816**2), abs=1e-4)
    assert wilson_lower_bound(0.5, 1000, 0.9) < wilson_lower_bound(0.5, 10_000, 0.9) < 0.5  # tighter with more facts


def test_the_retention_floor_is_checked_on_the_bound_of_the_reading() -> None:
    limits = HealthLimits(min_retention=0.95, retention_confidence=0.9)
    base = GeneralHealth(kl=0.0, top1_agreement=1.0, retention=1.0, ppl=20.0, fluency=5.0)
    lucky = GeneralHealth(kl=0.0, top1_agreement=1.0, retention=122 / 128, ppl=20.0, fluency=5.0)
    assert HealthLimits(min_retention=0.95).breaches(lucky, base, 128) == []  # the reading alone is within
    (breach,) = limits.breaches(lucky, base, 128)
    assert breach.startswith("fact retention 0.953 (lower 90% bound 0.9") and "on 128 facts" in breach
    assert limits.breaches(replace_retention(lucky, 1.0), base, 128) == []  # no fact lost: within
    assert limits.breaches(replace_retention(lucky, 250 / 256), base, 256) == []  # 6 of 256 lost: within
    assert limits.breaches(lucky, base) == []  # no fact count: the reading itself
    assert HealthLimits(min_retention=0.95, retention_confidence=0.5).breaches(lucky, base, 128) == []  # z = 0


def replace_retention(health: GeneralHealth, retention: float) -> GeneralHealth:
    return GeneralHealth(health.kl, health.top1_agreement, retention, health.ppl, health.fluency)


def test_each_check_draws_its_facts_afresh_from_the_firmly_known_ones(tiny_llama, tiny_tokenizer, tmp_path,
                                                                      monkeypatch) -> None:
    subjects = ["paris", "lyon", "rome", "france"]
    known = [RetentionFact(f"the capital of {subjects[i % 4]} is a city {i}", "paris", subjects[i % 4])
             for i in range(300)]
    margins = [(-0.1, 0.2, 1.0)[i % 3] for i in range(300)]  # not known / known by a hair / known firmly
    seen_pairs = []

    def fake_margins(model, tokenizer, pairs):
        seen_pairs.append(list(pairs))
        return torch.tensor(margins)

    monkeypatch.setattr(health_gate, "answer_margins", fake_margins)
    budget = GeneralBudget(max_tokens=64, max_facts=16, n_prompts=0, max_new_tokens=8)
    gate = HealthGate(tiny_llama, tiny_tokenizer, HealthLimits(min_retention=0.95, retention_confidence=0.9),
                      budget, tmp_path / "general", "tiny", None, rotate=True, facts=known, min_margin=0.5)
    firm = known[2::3]
    assert seen_pairs == [[(f.prompt, f.answer) for f in known]]  # measured once, on the base model
    assert gate.pool == gate.base_facts == firm  # the base reading is on every fact a check may draw
    first, again, other = gate.sample((), "e1\ne2"), gate.sample((), "e1\ne2"), gate.sample((), "e3")
    assert len(first) == 16 and first == again and first != other  # a retry of one batch sees the same facts
    assert set(map(id, first)) <= set(map(id, firm))
    seen = {f.prompt for seed in range(100) for f in gate.sample((), str(seed))}
    assert len(seen) > 0.9 * len(firm)  # not a fixed prefix
    assert all(f.subject != "rome" for seed in range(20) for f in gate.sample({"rome"}, str(seed)))
    assert len(gate.sample({"rome"}, "x")) == 16
    # a second gate finds the margins cached with the base reading; without a margin every known fact counts
    again_gate = HealthGate(tiny_llama, tiny_tokenizer, HealthLimits(), budget, tmp_path / "general", "tiny", None,
                            rotate=True, facts=known, min_margin=0.5)
    assert len(seen_pairs) == 1 and again_gate.pool == firm
    fixed = HealthGate(tiny_llama, tiny_tokenizer, HealthLimits(), budget, tmp_path / "general", "tiny", None,
                       facts=known)
    assert fixed.pool == [f for f, m in zip(known, margins, strict=True) if m > 0]
    assert fixed.sample((), "a") == fixed.sample((), "b") == fixed.pool[:16]


def _next_logp(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


def _gap(logp: torch.Tensor, target: int) -> float:
    """Log-prob of ``target`` minus the best other token's."""
    return float(logp[target] - torch.cat([logp[:target], logp[target + 1:]]).max())


def test_the_margin_is_the_least_gap_over_the_answer_tokens(tiny_llama, tiny_tokenizer) -> None:
    words = ["paris", "lyon", "rome", "france", "city", "capital", "the", "of"]
    specials = set(tiny_tokenizer.all_special_ids)
    right, half, expected = [], [], []
    for word in words:  # two-token answers: the model's own greedy pair, and its first word with the worst second
        prompt = f"the capital of {word} is"
        first = _next_logp(tiny_llama, tiny_tokenizer, prompt)
        t1 = int(first.argmax())
        second = _next_logp(tiny_llama, tiny_tokenizer, f"{prompt} {tiny_tokenizer.decode([t1])}")
        t2, worst = int(second.argmax()), int(second.argmin())
        if {t1, t2, worst} & specials:
            continue
        w1, w2, bad = (tiny_tokenizer.decode([t]) for t in (t1, t2, worst))
        right.append((prompt, f"{w1} {w2}"))
        half.append((prompt, f"{w1} {bad}"))
        expected.append(min(_gap(first, t1), _gap(second, t2)))
    assert len(right) >= 3
    pairs = right + half
    margins = answer_margins(tiny_llama, tiny_tokenizer, pairs)
    accuracy = token_accuracy(tiny_llama, tiny_tokenizer, pairs)
    assert accuracy[: len(right)].eq(1.0).all() and accuracy[len(right):].eq(0.5).all()  # one token of two right
    assert torch.equal(margins > 0, accuracy >= 1.0)  # positive exactly when every answer token is the argmax
    assert margins[: len(right)].tolist() == pytest.approx(expected, abs=1e-4)  # the lesser of the two gaps


def _gate(model, tokenizer, tmp_path, limits: HealthLimits) -> HealthGate:
    budget = GeneralBudget(max_tokens=256, max_facts=16, n_prompts=0, max_new_tokens=8)
    return HealthGate(model, tokenizer, limits, budget, tmp_path / "general", "tiny", "tiny-model")


def test_gate_passes_the_base_and_refuses_a_damaged_model(tiny_llama, tiny_tokenizer, tmp_path) -> None:
    gate = _gate(tiny_llama, tiny_tokenizer, tmp_path, HealthLimits(max_kl=1e-3, max_ppl_ratio=1.05))
    health = gate.check(tiny_llama, ())
    assert health.kl == pytest.approx(0.0, abs=1e-6) and health.top1_agreement == 1.0
    assert health.ppl == pytest.approx(gate.base.ppl)
    with torch.no_grad():
        for p in tiny_llama.model.layers[1].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with pytest.raises(GuardRejection) as info:
        gate.check(tiny_llama, (), ["e1", "e2"])
    assert info.value.reason == HEALTH_BUDGET and info.value.edit_ids == ["e1", "e2"]
    assert "KL to base" in str(info.value)
    # the base reading is cached beside the KL reference: a second gate built on the damaged model keeps the base's
    again = _gate(tiny_llama, tiny_tokenizer, tmp_path, HealthLimits(max_kl=1e-3))
    assert (again.base.kl, again.base.ppl) == (gate.base.kl, gate.base.ppl)


def test_the_cached_base_reading_must_match_the_facts_it_would_draw(tiny_llama, tiny_tokenizer, tmp_path,
                                                                    monkeypatch) -> None:
    known = [RetentionFact(f"the capital of france is a city {i}", "paris", "france") for i in range(20)]
    monkeypatch.setattr(health_gate, "load_retention_facts", lambda model_name=None: known)
    budget = GeneralBudget(max_tokens=64, max_facts=8, n_prompts=0, max_new_tokens=8)
    cache = tmp_path / "general"
    assert not HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=True, min_margin=0.5)
    HealthGate(tiny_llama, tiny_tokenizer, HealthLimits(), budget, cache, "tiny", "m", rotate=True, min_margin=0.5)
    assert HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=True, min_margin=0.5)
    assert not HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=False, min_margin=0.5)
    assert not HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=True, min_margin=1.0)
    reading = next(cache.rglob("*.json"))
    reading.write_text('{"key": ')  # a half-written file is a miss, measured again, never a crash
    assert not HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=True, min_margin=0.5)
    HealthGate(tiny_llama, tiny_tokenizer, HealthLimits(), budget, cache, "tiny", "m", rotate=True, min_margin=0.5)
    assert HealthGate.cached(tiny_tokenizer, budget, cache, "tiny", "m", rotate=True, min_margin=0.5)


def test_a_refused_batch_leaves_model_and_state_exactly_as_before(tiny_llama, tiny_tokenizer, stats,  # noqa: F811
                                                                  tmp_path) -> None:
    gate = _gate(tiny_llama, tiny_tokenizer, tmp_path, HealthLimits(max_kl=1e-9))
    editor = Editor(tiny_llama, tiny_tokenizer, _hp(), stats, "tiny")
    editor.apply(REQUESTS[:1])  # history to disturb (no gate: the first batch is kept)
    before = _snapshot(editor)
    with pytest.raises(GuardRejection) as info:
        editor.apply(REQUESTS[1:], accept=lambda model: gate.check(model, ()))
    assert info.value.reason == HEALTH_BUDGET
    assert _same(before, _snapshot(editor))
    kept = editor.apply(REQUESTS[1:], accept=lambda model: None)  # a gate that accepts: the batch is kept
    assert "accept" in kept.seconds and editor.state.n_batches == before["n"] + 1


def test_the_budget_is_on_by_default_and_can_be_turned_off(tiny_llama, tiny_tokenizer, tmp_path) -> None:
    settings = Settings(home=tmp_path, health_tokens=64, health_facts=0)
    gate = gate_from_settings(tiny_llama, tiny_tokenizer, settings, "tiny", "tiny-model")
    assert gate is not None and gate.limits.max_ppl_ratio == settings.health_max_ppl_ratio
    assert gate.probe.n_positions == 64
    assert gate_from_settings(tiny_llama, tiny_tokenizer, Settings(home=tmp_path, health_budget=False), "tiny",
                              "tiny-model") is None


def test_a_version_past_the_budget_never_goes_live(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, health_max_kl=1e-9, health_tokens=64)
    probe = Probe(settings)
    requests = tiny_requests(4)
    try:
        states = run_to_terminal(settings, probe, requests)
        assert set(states.values()) == {"rejected"}
        outcomes = probe.outcomes()
        assert len(outcomes) == len(requests)
        assert all(o.reason_code == HEALTH_BUDGET and "KL to base" in o.reason for o in outcomes)
        assert probe.head() == 0  # nothing was committed, so nothing can go live
    finally:
        probe.cleanup()


def test_the_back_off_skips_1_2_4_batches_after_patience_refusals_and_resets_on_a_new_head() -> None:
    backoff = BudgetBackoff(patience=2, max_skip=4)
    tried = []
    for _ in range(16):  # every batch on v5 that is tried is refused
        if backoff.should_try(5):
            tried.append(True)
            backoff.refused(5)
        else:
            tried.append(False)
    # refused, refused, then 1 skip, try, 2 skips, try, 4 skips, try, 4 skips (capped), try, ...
    assert tried == [True, True, False, True, False, False, True, False, False, False, False, True,
                     False, False, False, False]
    assert "refused the last 5 batches on v5" in backoff.describe()
    assert backoff.should_try(6) and backoff.wait() == 0  # a new head (a batch accepted, a revert): start afresh
    never = BudgetBackoff(patience=0)
    for _ in range(5):
        never.refused(1)
    assert never.should_try(1)


def test_a_spent_budget_sends_later_batches_straight_to_the_tier(ray_session, redis_url, tiny_model_dir,
                                                               tmp_path) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, health_max_kl=1e-9, health_tokens=64,
                                 batch_max_size=2, health_patience=1)
    probe = Probe(settings)
    requests = tiny_requests(8)
    try:
        states = run_to_terminal(settings, probe, requests)
        assert set(states.values()) == {"rejected"}
        outcomes = probe.outcomes()
        assert len(outcomes) == len(requests) and all(o.reason_code == HEALTH_BUDGET for o in outcomes)
        scored = [o for o in outcomes if "KL to base" in o.reason]
        skipped = [o for o in outcomes if "health budget spent" in o.reason]
        assert scored and skipped and len(scored) + len(skipped) == len(outcomes), [o.reason for o in outcomes]
        assert outcomes[0] in scored and "refused the last 1 batches on v0" in skipped[0].reason
        assert probe.head() == 0
    finally:
        probe.cleanup()
