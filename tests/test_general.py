"""General-ability measures (workers/evaluation/general.py): KL/agreement vs a cached base reference, fact
retention, n-gram-entropy fluency, and the shipped assets on the real SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from workers.evaluation.general import (
    CHEAP,
    BaseReference,
    GeneralProbe,
    RetentionFact,
    coarse_kl,
    compute_base_reference,
    fact_retention,
    fluency,
    general_health,
    kl_and_agreement,
    load_or_compute_reference,
    load_retention_facts,
    n_gram_entropy,
    reference_path,
    without_subjects,
)

TEXTS = [
    ("prose", "the capital of france is paris . the eiffel tower is located in paris , france ."),
    ("chat", "who plays jazz piano ? danielle darrieux plays jazz piano in london ."),
    ("list", "x , y , z , x , y , z , a city , a language , a tower ."),
    ("prose", "the mother tongue of danielle darrieux is french because she is french ."),
]


@pytest.fixture
def probe(tiny_tokenizer) -> GeneralProbe:
    return GeneralProbe.from_texts(tiny_tokenizer, TEXTS)


def _perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(scale * torch.randn(w.shape, generator=gen))


def _exact_kl(base: torch.nn.Module, edited: torch.nn.Module, probe: GeneralProbe) -> float:
    """Full-vocabulary KL(base || edited) per position, averaged, computed directly from the logits."""
    total, n = 0.0, 0
    for row in probe.rows:
        ids = torch.tensor([row])
        lp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
        lq = torch.log_softmax(edited(input_ids=ids).logits[0, :-1].float(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
        n += len(row) - 1
    return total / n


def test_base_model_against_its_own_reference(tiny_llama, tiny_tokenizer, probe) -> None:
    ref = compute_base_reference(tiny_llama, tiny_tokenizer, probe, k=8)
    assert ref.n_positions == probe.n_positions == sum(len(r) - 1 for r in probe.rows)
    assert ref.topk_ids.shape == (probe.n_positions, 8)
    # top-k mass plus tail mass is the whole distribution
    mass = ref.topk_logp.exp().sum(1) + ref.tail_logp.exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)
    kl, agreement = kl_and_agreement(tiny_llama, tiny_tokenizer, probe, ref)
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert agreement == 1.0


def test_perturbed_model_kl_is_positive_and_a_lower_bound(tiny_llama, tiny_tokenizer, probe) -> None:
    import copy

    ref = compute_base_reference(tiny_llama, tiny_tokenizer, probe, k=8)
    edited = copy.deepcopy(tiny_llama)
    _perturb(edited)
    kl, agreement = kl_and_agreement(edited, tiny_tokenizer, probe, ref)
    exact = _exact_kl(tiny_llama, edited, probe)
    assert kl > 1e-3
    assert kl <= exact + 1e-6  # data-processing inequality: coarsening loses divergence
    assert 0.0 <= agreement < 1.0
    # with k covering the whole vocabulary the coarsening is the identity: the bound is tight
    full_ref = compute_base_reference(tiny_llama, tiny_tokenizer, probe, k=len(tiny_tokenizer))
    full_kl, _ = kl_and_agreement(edited, tiny_tokenizer, probe, full_ref)
    assert full_kl == pytest.approx(exact, rel=1e-4)
    assert kl < full_kl


def test_coarse_kl_handles_a_zero_tail() -> None:
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    lq = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = coarse_kl(lp, torch.tensor([float("-inf")]), lq, torch.log(torch.tensor([0.5])))
    assert float(kl[0]) == pytest.approx(math.log(2))


def test_prefix_of_probe_uses_prefix_of_reference(tiny_llama, tiny_tokenizer, probe) -> None:
    import copy

    ref = compute_base_reference(tiny_llama, tiny_tokenizer, probe, k=8)
    edited = copy.deepcopy(tiny_llama)
    _perturb(edited)
    short = probe.truncated(20)
    assert short.n_positions == 20 and short.rows[0] == probe.rows[0]
    short_ref = compute_base_reference(tiny_llama, tiny_tokenizer, short, k=8)
    assert torch.equal(short_ref.topk_ids, ref.topk_ids[:20])
    assert kl_and_agreement(edited, tiny_tokenizer, probe, ref, max_tokens=20) == pytest.approx(
        kl_and_agreement(edited, tiny_tokenizer, short, short_ref)
    )
    with pytest.raises(ValueError, match="reference is for probe"):
        kl_and_agreement(edited, tiny_tokenizer, short, ref)


def test_reference_save_load_round_trip_and_cache(tiny_llama, tiny_gpt2, tiny_tokenizer, probe, tmp_path) -> None:
    ref = compute_base_reference(tiny_gpt2, tiny_tokenizer, probe, k=8)
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    back = BaseReference.load(path)
    assert back.probe_id == ref.probe_id
    assert torch.equal(back.topk_ids, ref.topk_ids) and back.topk_ids.dtype == torch.long
    assert torch.equal(back.topk_logp, ref.topk_logp) and torch.equal(back.tail_logp, ref.tail_logp)

    first = load_or_compute_reference(tiny_gpt2, tiny_tokenizer, probe, tmp_path / "cache", "fp-a", k=8)
    cached = reference_path(tmp_path / "cache", "fp-a", probe, k=8)
    assert cached.is_file() and cached.parent.name == "fp-a"
    # a second call loads the file: another model passed in changes nothing
    again = load_or_compute_reference(tiny_llama, tiny_tokenizer, probe, tmp_path / "cache", "fp-a", k=8)
    assert torch.equal(again.topk_ids, first.topk_ids)


def test_n_gram_entropy_exact_values() -> None:
    assert n_gram_entropy("a a a a a a") == 0.0
    # 3 distinct bigrams, 2 distinct trigrams: (2/3 log2 3 + 4/3 * 1) / 2
    assert n_gram_entropy("a b c d") == pytest.approx(math.log2(3) / 3 + 2 / 3)
    assert n_gram_entropy("the cat sat . the cat sat . the cat sat .") < n_gram_entropy(
        "the cat sat on a mat while dogs ran past the old red barn ."
    )


def test_retention_excludes_edited_subjects(tiny_llama, tiny_tokenizer) -> None:
    facts = [
        RetentionFact("the capital of france is", "paris", "france"),
        RetentionFact("danielle darrieux plays", "jazz", "danielle darrieux"),
        RetentionFact("the language spoken in germany is", "french", None),  # neighbourhood prompt, no subject field
        RetentionFact("the city of london is", "a", None),
    ]
    kept = without_subjects(facts, ["france", "germany"])
    assert [f.prompt for f in kept] == ["danielle darrieux plays", "the city of london is"]
    assert without_subjects(facts, ["germ", "France"]) == facts  # whole word, case-sensitive
    # retention of an answer set the model gets exactly: the model's own greedy answers
    greedy = []
    for f in facts:
        ids = torch.tensor([tiny_tokenizer(f.prompt)["input_ids"]])
        logits = tiny_llama(ids).logits[0, -1]
        top = int(logits.argmax())
        if top in tiny_tokenizer.all_special_ids:  # an answer must be a word: skip the cases the rule cannot score
            continue
        greedy.append(RetentionFact(f.prompt, tiny_tokenizer.decode([top]), f.subject))
    assert len(greedy) == 4
    assert fact_retention(tiny_llama, tiny_tokenizer, greedy) == 1.0
    wrong = [RetentionFact(f.prompt, "sega" if f.answer != "sega" else "sony", f.subject) for f in greedy]
    assert fact_retention(tiny_llama, tiny_tokenizer, greedy[:2] + wrong[2:]) == 0.5
    assert fact_retention(tiny_llama, tiny_tokenizer, greedy[:2] + wrong[2:], exclude_subjects=["germany"]) == (
        pytest.approx(2 / 3)
    )
    assert math.isnan(fact_retention(tiny_llama, tiny_tokenizer, greedy[:1], exclude_subjects=["france"]))


def test_fluency_and_general_health_on_tiny_model(tiny_llama, tiny_tokenizer, probe) -> None:
    value = fluency(tiny_llama, tiny_tokenizer, ["the capital of", "who plays jazz", "x y"], max_new_tokens=12)
    assert 0.0 <= value <= (2 / 3 * math.log2(11) + 4 / 3 * math.log2(10)) / 2  # at most 11 bigrams, 10 trigrams
    ref = compute_base_reference(tiny_llama, tiny_tokenizer, probe, k=8)
    facts = [RetentionFact("the capital of france is", "paris", "france")]
    health = general_health(tiny_llama, tiny_tokenizer, probe, ref, facts, exclude_subjects=["france"],
                            budget=CHEAP, prompts=["the capital of", "x y"], texts=[t for _, t in TEXTS])
    assert health.kl == pytest.approx(0.0, abs=1e-6) and health.top1_agreement == 1.0
    assert math.isnan(health.retention)  # the only fact was about an edited subject
    assert health.ppl > 1.0 and health.fluency >= 0.0


def test_retention_facts_are_for_smollm2_only() -> None:
    assert load_retention_facts("some-other-model") == []
    facts = load_retention_facts("SmolLM2-135M-Instruct")
    # 620 shipped: all that SmolLM2 completes strictly among the usable val + train-neighbourhood prompts
    assert len(facts) >= 600 and all(f.prompt and f.answer for f in facts)
    assert len({f.prompt for f in facts}) == len(facts)


@pytest.mark.slow
def test_shipped_assets_on_smollm2(smollm2) -> None:
    model, tokenizer = smollm2
    facts = load_retention_facts("SmolLM2-135M-Instruct")
    assert len(facts) >= 600
    assert fact_retention(model, tokenizer, facts) == 1.0  # by construction: the base model knows every one
    probe = GeneralProbe.from_asset(tokenizer)
    assert probe.n_positions >= 20_000
    assert {"heldout", "prose", "chat", "list"} <= set(probe.kinds)
    assert set(probe.truncated(4096).kinds) == {"heldout", "prose", "chat", "list"}  # a prefix stays mixed


def test_eval_general_block_on_tiny_model(tiny_model_dir, tmp_path) -> None:
    """`editq eval`'s general block: reference cached under home/general, no retention facts for a non-SmolLM2
    model (null, not NaN), and KL 0 / agreement 1 while the model is unchanged."""
    from shared.settings import Settings
    from workers.evaluation.runner import GeneralPre
    from workers.model_io import load_model, model_fingerprint

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    settings = Settings(home=tmp_path / "home")
    fingerprint = model_fingerprint(tiny_model_dir)
    pre = GeneralPre.measure(model, tokenizer, settings, fingerprint, tiny_model_dir, ["paris"])
    assert pre.facts == [] and math.isnan(pre.retention)
    assert list((tmp_path / "home" / "general" / fingerprint).glob("*-top32.safetensors"))
    out = pre.report(model, tokenizer, 10.0, 11.0)
    assert set(out) == {"kl", "top1_agreement", "retention_pre", "retention_post", "ppl_pre", "ppl_post",
                        "fluency_pre", "fluency_post"}
    assert out["kl"] == pytest.approx(0.0, abs=1e-6) and out["top1_agreement"] == 1.0
    assert out["retention_pre"] is None and out["retention_post"] is None
    assert out["fluency_post"] == pytest.approx(out["fluency_pre"]) and out["ppl_post"] == 11.0
