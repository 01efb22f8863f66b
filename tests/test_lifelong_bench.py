"""benchmarks/lifelong.py's per-configuration loop on a tiny model: checkpoints land in the JSON, a gate that accepts
nothing (health_max_kl=1e-9) routes every edit to the tier and leaves the model untouched, no gate puts every edit in
the weights. The general-text asset and the retention facts are SmolLM2's, so the gate is built on a probe of the tiny
tokenizer's words, and the tier is a fake scorer (no RECIPE checkpoint exists for a tiny model)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.lifelong_loop import LoopOptions, config_hparams, general_evaluator, parse_config, run_loop
from shared.schemas import EditRequest, Probe
from shared.settings import Settings
from tests.test_guards import _hp, stats  # noqa: F401 (fixture)
from workers.editing.editor import Editor
from workers.evaluation import health_gate
from workers.evaluation.general import GeneralProbe, compute_base_reference
from workers.evaluation.metrics import counterfact_metrics

TEXTS = [("prose", "the capital of france is paris . the eiffel tower is located in paris"),
         ("prose", "berlin is a city in germany and london is famous for music"),
         ("chat", "who plays jazz piano ? i and you plays piano in london")]
SUBJECTS = ["france", "germany", "london", "berlin", "sega", "sony"]
TARGETS = ["rome", "lyon", "paris", "berlin"]


def _requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(edit_id=f"e{i}", subject=SUBJECTS[i % len(SUBJECTS)], prompt="the capital of {} is",
                    target_new=TARGETS[i % len(TARGETS)], target_true=TARGETS[(i + 1) % len(TARGETS)],
                    paraphrase_prompts=[f"what city is the capital of {SUBJECTS[i % len(SUBJECTS)]} ?"],
                    neighborhood_prompts=[Probe(prompt="the capital of italy is", target="rome")])
        for i in range(n)
    ]


class FakeTier:
    """Stands in for RECIPE: holds the routed edits and scores them on the model alone."""

    def __init__(self) -> None:
        self.held: list[EditRequest] = []

    def add(self, edits: Sequence[EditRequest]) -> None:
        self.held.extend(edits)

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              edits: Sequence[EditRequest]) -> dict[str, float]:
        assert all(e in self.held for e in edits)
        return counterfact_metrics(model, tokenizer, edits).as_dict()


@pytest.fixture
def tiny_general(tiny_llama, tiny_tokenizer, monkeypatch):
    """The gate reads the shipped asset and SmolLM2's facts: point both at the tiny tokenizer's world."""
    probe = GeneralProbe.from_texts(tiny_tokenizer, TEXTS)
    monkeypatch.setattr(GeneralProbe, "from_asset", classmethod(lambda cls, tok, max_tokens=None, path=None: probe))
    monkeypatch.setattr(health_gate, "load_retention_facts", lambda model_name=None: [])
    return general_evaluator(tiny_tokenizer, probe, compute_base_reference(tiny_llama, tiny_tokenizer, probe), [])


def test_config_names() -> None:
    assert parse_config("today") == ("alphaedit", False)
    assert parse_config("budget") == ("alphaedit", True)
    assert parse_config("hybrid_budget") == ("alphaedit_hybrid", True)
    assert parse_config("memit+budget") == ("memit", True) and parse_config("memit") == ("memit", False)
    assert parse_config("alphaedit+cap@0.3") == ("alphaedit", False)
    assert parse_config("alphaedit_hybrid+cap@0.2+budget") == ("alphaedit_hybrid", True)
    assert config_hparams("alphaedit+cap@0.3+budget") == {"norm_cap": 0.3} and config_hparams("today") == {}
    for bad in ("memit+revive", "memit+budget+budget"):
        with pytest.raises(ValueError):
            parse_config(bad)
    assert config_hparams("alphaedit+l2@100+energy@0.9") == {"l2": 100.0, "nullspace_energy": 0.9}
    assert parse_config("alphaedit_hybrid+energy@0.8+budget") == ("alphaedit_hybrid", True)
    with pytest.raises(ValueError, match=r"\+cap needs its value"):
        config_hparams("alphaedit+cap")
    with pytest.raises(ValueError, match="not a number"):
        config_hparams("alphaedit+l2@ten")


def test_collapse_benchmark_config_names_share_the_grammar() -> None:
    from benchmarks.sequential_collapse import config_overrides

    algo, overrides = config_overrides("alphaedit+revive@0.8+cap@0.3")
    assert algo == "alphaedit" and overrides["guard"] == "revive"
    assert overrides["revive_energy"] == 0.8 and overrides["norm_cap"] == 0.3 and overrides["prune"] is False
    swept = config_overrides("alphaedit+l2@1+energy@0.9")[1]
    assert swept["l2"] == 1.0 and swept["nullspace_energy"] == 0.9
    assert config_overrides("alphaedit_hybrid")[1]["guard"] == "none"
    for bad in ("alphaedit+cap", "alphaedit+prune+prune", "ultraedit"):
        with pytest.raises(ValueError):
            config_overrides(bad)


@pytest.mark.parametrize("budget", [False, True])
def test_loop_checkpoints_and_an_impossible_budget_routes_everything_to_the_tier(
    budget, tiny_llama, tiny_tokenizer, stats, tiny_general, tmp_path  # noqa: F811
) -> None:
    gate = None
    if budget:
        settings = Settings(home=tmp_path / "home", health_max_kl=1e-9, health_tokens=16, health_facts=0)
        gate = health_gate.gate_from_settings(tiny_llama, tiny_tokenizer, settings, "tiny", None)
        assert gate is not None
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    editor = Editor(tiny_llama, tiny_tokenizer, _hp(algo="alphaedit"), stats, "tiny")
    out = tmp_path / "part.json"
    opts = LoopOptions("budget" if budget else "today", batch_size=2, eval_every=4, probe=3, out=out, patience=1)
    result = run_loop(editor, _requests(6), tiny_general, gate.check if gate else None, FakeTier(), opts)

    data = json.loads(out.read_text())
    assert data["n_edits"] == 6 == result["n_edits"]
    assert [p["edits"] for p in data["points"]] == [0, 4, 6]  # base, every 4 edits, the end
    assert len(data["batches"]) == 3
    last = data["points"][-1]
    assert {"kl", "top1_agreement", "retention", "ppl", "fluency"} <= set(last["general"])
    assert last["probe_edits"]["weights"] + last["probe_edits"]["tier"] == 3
    for key in ("served_efficacy", "served_generalization", "served_specificity", "pre_efficacy", "ppl_ratio",
                "seconds_per_edit"):
        assert key in last
    unchanged = all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())
    if budget:  # KL <= 1e-9 admits no update: every batch refused, the model exactly the base model
        assert last["weights_share"] == 0 and last["tier_share"] == 1
        assert all(not b["accepted"] and b["reason"] == "health_budget" for b in data["batches"])
        # the controller's back-off: after one refusal the next batch skips the weights, the third tries again
        assert [b.get("skipped", False) for b in data["batches"]] == [False, True, False]
        assert last["weights"] is None and last["tier"] is not None
        assert last["general"]["kl"] == pytest.approx(0.0, abs=1e-6) and unchanged
        assert last["served_efficacy"] == pytest.approx(last["pre_efficacy"])  # fake tier = the unchanged model
    else:
        assert last["weights_share"] == 1 and last["tier_share"] == 0 and not unchanged
        assert all(b["accepted"] for b in data["batches"])
        assert last["general"]["kl"] > 0
        # the pre-edit metrics swap the base matrices in, then write the edited ones back exactly
        for layer, weight in editor.state.weights.items():
            assert torch.equal(editor.layout.get_weight(tiny_llama, layer).float().cpu(), weight)


def test_firm_and_held_out_retention_score_only_their_own_facts(tiny_llama, tiny_tokenizer) -> None:
    """The benchmark's firm retention scores the gate's facts alone, its held-out retention the ones a fixed gate
    sample never sees."""
    from workers.evaluation.general import RetentionFact, fact_retention

    known, unknown = [], []
    for i in range(40):  # facts the tiny model completes (its own greedy token) and facts it does not
        prompt = f"item {i} goes with"
        ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = tiny_llama(ids).logits[0, -1].argsort(descending=True)
        for rank, bucket in ((0, known), (-1, unknown)):
            fact = RetentionFact(prompt=prompt, answer=tiny_tokenizer.decode([int(top[rank])]), subject=f"s{i}")
            if fact_retention(tiny_llama, tiny_tokenizer, [fact]) == (1.0 if rank == 0 else 0.0):
                bucket.append(fact)
    assert len(known) >= 2 and len(unknown) >= 4
    facts = unknown[:4] + known[:2]  # the gate's 4 are all lost, the 2 held out are all kept
    probe = GeneralProbe.from_texts(tiny_tokenizer, TEXTS)
    reference = compute_base_reference(tiny_llama, tiny_tokenizer, probe)
    out = general_evaluator(tiny_tokenizer, probe, reference, facts, firm=unknown[:3] + known[:1],
                            unseen=known[:2])(tiny_llama, [])
    assert out["retention_heldout"] == 1.0 and out["retention_firm"] == 0.25 and out["retention"] < 1.0
    plain = general_evaluator(tiny_tokenizer, probe, reference, facts)(tiny_llama, [])
    assert "retention_heldout" not in plain and "retention_firm" not in plain
