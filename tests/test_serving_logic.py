"""Rollout gates, rollback, routing and the OpenAI-compatible API against in-process fake replicas (no Ray, no
vLLM): the decision logic in seconds. The real engines are exercised in test_serving.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from controller.rollout.rolling import DEFAULT_CONTROL_FACTS_FILE, RolloutManager, load_control_facts
from controller.rollout.router import NoReplicaError, Router
from workers.serving.config import ServingSettings
from workers.serving.schemas import (
    ControlFact,
    EditProbe,
    GenerateRequest,
    GenerateResult,
    ReplicaState,
    ReplicaStatus,
    ReplicaUnavailableError,
    RequestAbortedError,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
    SwapReport,
    TokenLogprob,
    TopLogprob,
)

FACTS = [ControlFact(prompt="The capital of France is", answer="Paris"),
         ControlFact(prompt="The capital of Spain is", answer="Madrid")]
PROBE = EditProbe(prompt="BBC One, by", target_new="Sega", target_true="BBC", subject="BBC One")
SHIFTED = "The channel's owner is"
GOOD, BAD, NO_TAKE = 1, 2, 3  # versions: the edit takes / controls collapse / the edit does not take


def answer(version: int, prompt: str) -> str:
    if version == BAD:
        return " may may may"
    if prompt in (PROBE.prompt, SHIFTED):  # SHIFTED: a neighbour the edit changes without naming its subject
        return " Sega, a company" if version == GOOD else " the BBC"
    return " Paris." if "France" in prompt else " Madrid."


class FakeReplica:
    def __init__(self, name: str, version: int = 0, log: list | None = None) -> None:
        self.name, self.version, self.state = name, version, ReplicaState.ready
        self.log = log if log is not None else []
        self.fail_swap_to: set[int] = set()
        self.die_on_swap = False
        self.served = self.failed = self.attempts = 0
        self.requests: list[GenerateRequest] = []

    async def status(self) -> ReplicaStatus:
        return ReplicaStatus(name=self.name, state=self.state, version=self.version, incarnation="x",
                             served=self.served, failed=self.failed)

    def _admit(self, internal: bool) -> None:
        if not (self.state == ReplicaState.ready or (internal and self.state == ReplicaState.canary)):
            raise ReplicaUnavailableError(f"{self.name} is {self.state}")

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.attempts += 1
        self._admit(request.internal)
        self.served += 1
        self.log.append(("generate", self.name, self.state.value, request.internal))
        self.requests.append(request)
        text = answer(self.version, request.prompt or "")
        return GenerateResult(text=text, token_ids=[1], finish_reason="length", prompt_tokens=3, completion_tokens=1,
                              version=self.version, replica=self.name, engine_versions=[str(self.version)],
                              logprobs=_logprobs(text.split(" ")[1:], request.logprobs))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        self._admit(request.internal)
        for piece in answer(self.version, request.prompt or "Q").split(" ")[1:]:
            yield StreamChunk(text=" " + piece, version=self.version, replica=self.name,
                              logprobs=_logprobs([piece], request.logprobs))
        yield StreamChunk(text="", finish_reason="stop", version=self.version, replica=self.name,
                          logprobs=_logprobs([], request.logprobs))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self._admit(True)
        return ScoreResult(mean_logprobs=[-5.0, -1.0], version=self.version, replica=self.name)

    async def apply_version(self, version: int, hold: bool = False, pause_timeout_s: float | None = None) -> SwapReport:
        self.log.append(("swap", self.name, version, hold))
        if self.die_on_swap:
            self.state = ReplicaState.starting
            raise ConnectionError("actor died")
        if version in self.fail_swap_to:
            return SwapReport(replica=self.name, from_version=self.version, to_version=version, ok=False,
                              error="checksum mismatch")
        self.state = ReplicaState.swapping
        await asyncio.sleep(0.01)
        previous, self.version = self.version, version
        self.state = ReplicaState.canary if hold else ReplicaState.ready
        self.log.append(("swapped", self.name))
        return SwapReport(replica=self.name, from_version=previous, to_version=version, ok=True, checksums_ok=True)

    async def release(self) -> ReplicaStatus:
        self.state = ReplicaState.ready
        return await self.status()

    async def restart(self) -> None:
        self.log.append(("restart", self.name))
        self.state = ReplicaState.starting


def _logprobs(words: list[str], top: int | None) -> list[TokenLogprob] | None:
    """A replica's log-probabilities as vLLM orders them: the sampled token, then ``top`` candidates by rank."""
    if top is None:
        return None
    return [TokenLogprob(token=" " + w, token_id=i, logprob=-0.5,
                         top=[TopLogprob(token=" " + w, logprob=-0.5)]
                         + [TopLogprob(token=f" alt{k}", logprob=-1.0 - k) for k in range(top)])
            for i, w in enumerate(words)]


def fleet(n: int = 2, **settings) -> tuple[list[FakeReplica], RolloutManager, list]:
    log: list = []
    replicas = [FakeReplica(f"r{i}", log=log) for i in range(n)]
    settings.setdefault("serving_canary_soak_s", 0.0)  # fake replicas take no traffic to judge
    manager = RolloutManager(replicas, ServingSettings(**settings), control_facts=FACTS)
    return replicas, manager, log


def test_good_version_goes_to_a_held_canary_then_to_the_rest() -> None:
    replicas, manager, log = fleet(3)
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "live", result.reason
    assert [r.version for r in replicas] == [GOOD] * 3
    assert all(r.state == ReplicaState.ready for r in replicas)
    swaps = [e for e in log if e[0] == "swap"]
    assert swaps == [("swap", "r0", GOOD, True), ("swap", "r1", GOOD, False), ("swap", "r2", GOOD, False)]
    probes_on_canary = [e for e in log if e[0] == "generate" and e[1] == "r0" and e[2] == "canary"]
    assert probes_on_canary and all(internal for *_, internal in probes_on_canary)
    assert {g.gate for g in result.gates} >= {"swap", "probes", "controls", "error_rate"}
    assert all(g.ok for g in result.gates)


@pytest.mark.parametrize(("version", "gate"), [(BAD, "probes"), (NO_TAKE, "probes")])
def test_failed_canary_gate_rolls_back_and_leaves_the_rest_untouched(version: int, gate: str) -> None:
    replicas, manager, log = fleet(2)
    result = asyncio.run(manager.deploy(version, [PROBE]))
    assert result.status == "rolled_back"
    assert result.reason.startswith(f"{gate} gate failed on r0")
    assert [r.version for r in replicas] == [0, 0]
    assert all(r.state == ReplicaState.ready for r in replicas)
    assert [e for e in log if e[0] == "swap"] == [("swap", "r0", version, True), ("swap", "r0", 0, False)]


@pytest.mark.parametrize(("version", "status"), [(NO_TAKE, "live"), (GOOD, "rolled_back")])
def test_a_revert_rolls_out_only_when_the_reverted_edit_is_gone(version: int, status: str) -> None:
    replicas, manager, _ = fleet(2)
    reverted = PROBE.model_copy(update={"absent": True})  # the version must no longer answer "Sega"
    result = asyncio.run(manager.deploy(version, [reverted]))
    assert result.status == status, result.reason
    if status == "rolled_back":
        assert "(reverted)" in result.reason and [r.version for r in replicas] == [0, 0]


def test_lost_control_fact_fails_the_gate_even_without_probes() -> None:
    replicas, manager, _ = fleet(2)
    result = asyncio.run(manager.deploy(BAD, []))
    assert result.status == "rolled_back" and result.reason.startswith("controls gate failed")
    assert "The capital of France is" in result.reason
    assert [r.version for r in replicas] == [0, 0]


def test_control_facts_about_an_edited_subject_are_not_judged() -> None:
    _, manager, _ = fleet(1)
    probe = PROBE.model_copy(update={"subject": "France"})
    assert [f.answer for f in manager._facts([probe])] == ["Madrid"]
    short = PROBE.model_copy(update={"subject": "Fr"})  # letters of a word are not a mention
    assert len(manager._facts([short])) == len(FACTS)


def test_the_clients_neighbourhood_prompts_join_the_control_gate() -> None:
    from controller.rollout.rolling import probes_from_requests
    from shared.schemas import EditRequest, Probe

    request = EditRequest(subject="Acme Corp", prompt="The CEO of {} is", target_new="Jane Doe",
                          neighborhood_prompts=[Probe(prompt="The capital of Spain is", target="Madrid"),
                                                Probe(prompt="The CEO of Globex is", target="Ann Lee"),
                                                Probe(prompt="Acme Corp was founded in", target="1950")])
    _, manager, _ = fleet(1)
    assert manager._neighbours(probes_from_requests([request])) == []  # only a version's own edits bring theirs
    probes = probes_from_requests([request], neighbours=True)
    prompts = [f.prompt for f in manager._neighbours(probes)]
    assert prompts == ["The CEO of Globex is"]  # judged on the canary beside the control facts
    # ("Acme Corp was founded in" mentions the edited subject: free to change; Spain's capital is a control fact)
    many = [request.model_copy(update={"edit_id": f"e{i}", "subject": f"Firm {i}", "neighborhood_prompts": [
        Probe(prompt=f"Fact {i}.{j} is", target="x") for j in range(10)]}) for i in range(6)]
    picked = manager._neighbours(probes_from_requests(many, neighbours=True))
    assert len(picked) == 16 and {f.prompt.split(".")[0] for f in picked} == {f"Fact {i}" for i in range(6)}


def test_one_clients_neighbours_cannot_block_the_rollout_alone() -> None:
    _, manager, _ = fleet(2, serving_neighbour_min_kept=0.75)
    neighbours = [ControlFact(prompt=f"Elsewhere {i}", answer="Madrid") for i in range(3)]
    neighbours.append(ControlFact(prompt=SHIFTED, answer="BBC"))  # a paraphrase the edit changes
    probe = PROBE.model_copy(update={"neighbours": neighbours})
    result = asyncio.run(manager.deploy(GOOD, [probe]))
    gate = next(g for g in result.gates if g.gate == "neighbours")
    assert result.status == "live" and gate.ok and gate.value == 0.75  # 3 of 4 kept: within the share
    strict = fleet(2, serving_neighbour_min_kept=1.0)[1]
    assert asyncio.run(strict.deploy(GOOD, [probe])).status == "rolled_back"


def test_a_later_swap_failure_rolls_back_every_updated_replica_in_reverse() -> None:
    replicas, manager, log = fleet(3)
    replicas[2].fail_swap_to = {GOOD}
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "rolled_back" and "r2" in result.reason
    assert [r.version for r in replicas] == [0, 0, 0]
    rollbacks = [e for e in log if e[0] == "swap" and e[2] == 0]
    assert [e[1] for e in rollbacks] == ["r2", "r1", "r0"]


def test_a_replica_dying_after_the_canary_does_not_undo_a_good_version() -> None:
    replicas, manager, _ = fleet(3)
    replicas[1].die_on_swap = True
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "live", result.reason
    assert replicas[0].version == replicas[2].version == GOOD
    dead = next(o for o in result.replicas if o.replica == "r1")
    assert dead.final_version is None and "died" in next(g.detail for g in result.gates if g.replica == "r1")


def test_canary_dying_rolls_back() -> None:
    replicas, manager, _ = fleet(2)
    replicas[0].die_on_swap = True
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "rolled_back" and "r0" in result.reason
    assert replicas[1].version == 0


def test_no_ready_replica_skips() -> None:
    replicas, manager, _ = fleet(2)
    for r in replicas:
        r.state = ReplicaState.starting
    result = asyncio.run(manager.deploy(GOOD, [PROBE]))
    assert result.status == "skipped" and [r.version for r in replicas] == [0, 0]


def test_max_unavailable_swaps_in_waves() -> None:
    replicas, manager, log = fleet(5, serving_max_unavailable=2)
    assert asyncio.run(manager.deploy(GOOD, [PROBE])).status == "live"
    assert [r.version for r in replicas] == [GOOD] * 5
    events = [(e[0], e[1]) for e in log if e[0] in ("swap", "swapped")]
    assert events[:2] == [("swap", "r0"), ("swapped", "r0")]  # the canary alone
    assert {e for e in events[2:4]} == {("swap", "r1"), ("swap", "r2")}  # then two at a time, never three
    assert {e for e in events[4:6]} == {("swapped", "r1"), ("swapped", "r2")}
    assert {e for e in events[6:8]} == {("swap", "r3"), ("swap", "r4")}


def test_reconcile_moves_stragglers_to_live_and_restarts_failed() -> None:
    replicas, manager, log = fleet(3)
    replicas[0].version, replicas[1].state = GOOD, ReplicaState.failed
    manager.streams = None
    replicas[2].version = GOOD  # majority at GOOD = live without Redis
    asyncio.run(manager.reconcile())
    assert ("restart", "r1") in log and replicas[1].state == ReplicaState.starting


# ---- router ---------------------------------------------------------------------------------------------------
def router(replicas: list[FakeReplica], **settings) -> Router:
    values = {"serving_status_ttl_s": 0.01, "serving_min_version_wait_s": 0.3, **settings}
    return Router(replicas, ServingSettings(**values))


def test_router_never_picks_a_swapping_or_canary_replica() -> None:
    replicas = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    replicas[0].state, replicas[1].state = ReplicaState.swapping, ReplicaState.canary
    r = router(replicas)
    results = asyncio.run(_many(r, GenerateRequest(prompt="x", max_tokens=1), 6))
    assert {res.replica for res in results} == {"c"}
    assert replicas[0].attempts == replicas[1].attempts == 0  # not even tried (the replica's own gate not needed)


def test_router_honours_min_version_and_says_why_when_none_has_it() -> None:
    replicas = [FakeReplica("a", version=1), FakeReplica("b", version=2)]
    r = router(replicas)
    results = asyncio.run(_many(r, GenerateRequest(prompt="x", max_tokens=1, min_version=2), 4))
    assert {res.replica for res in results} == {"b"}
    with pytest.raises(NoReplicaError, match=r"version >= 3.*a=ready@1, b=ready@2"):
        asyncio.run(r.generate(GenerateRequest(prompt="x", max_tokens=1, min_version=3)))


def test_router_reroutes_a_request_refused_by_a_replica_that_started_swapping() -> None:
    replicas = [FakeReplica("a"), FakeReplica("b")]
    r = router(replicas, serving_status_ttl_s=60)
    asyncio.run(r.refresh(force=True))
    replicas[0].state = ReplicaState.swapping  # the router's table is stale: both look ready
    results = asyncio.run(_many(r, GenerateRequest(prompt="x", max_tokens=1), 4))
    assert {res.replica for res in results} == {"b"}


class SlowStatusReplica(FakeReplica):
    """A replica whose status call takes 0.3 s (a busy actor's event loop)."""

    async def status(self) -> ReplicaStatus:
        await asyncio.sleep(0.3)
        return await super().status()


def test_a_stale_table_is_refreshed_in_the_background_not_on_the_request_path() -> None:
    replicas = [SlowStatusReplica("a"), SlowStatusReplica("b", version=1)]
    r = router(replicas, serving_status_ttl_s=0.05)

    async def go() -> None:
        t0 = time.monotonic()
        await r.generate(GenerateRequest(prompt="x", max_tokens=1))  # nothing known yet: this one waits
        assert time.monotonic() - t0 >= 0.3
        replicas[1].version = 2
        await asyncio.sleep(0.1)  # the table is now older than its TTL
        t0 = time.monotonic()
        for _ in range(4):
            await r.generate(GenerateRequest(prompt="x", max_tokens=1))
        assert time.monotonic() - t0 < 0.2  # answered from the known table while it is re-read
        assert r.views["b"].version == 1  # (not yet re-read)
        await asyncio.sleep(0.4)  # the background refresh has landed
        assert r.views["b"].version == 2
        request = GenerateRequest(prompt="x", max_tokens=1, min_version=2)
        assert (await r.generate(request)).replica == "b"

    asyncio.run(go())


def test_router_retries_a_request_a_swap_aborted_elsewhere() -> None:
    replicas = [FakeReplica("a"), FakeReplica("b")]
    calls = []

    async def aborted(request: GenerateRequest) -> GenerateResult:
        calls.append("a")
        raise RequestAbortedError("aborted during a swap")

    replicas[0].generate = aborted
    r = router(replicas)
    results = asyncio.run(_many(r, GenerateRequest(prompt="x", max_tokens=1), 3))
    assert {res.replica for res in results} == {"b"} and calls  # "a" was tried, nothing failed


async def _many(r: Router, request: GenerateRequest, n: int) -> list[GenerateResult]:
    return [await r.generate(request) for _ in range(n)]


def test_a_rolling_restart_never_takes_the_last_ready_replica_out() -> None:
    from controller.rollout.upgrade import UpgradeRefused, rolling_restart

    replicas = [FakeReplica("a", version=GOOD), FakeReplica("b", version=GOOD)]
    replicas[1].state = ReplicaState.starting  # b cannot take a's traffic

    async def live() -> int:
        return GOOD

    with pytest.raises(UpgradeRefused, match="no ready replica"):
        asyncio.run(rolling_restart(replicas, live))
    assert ("restart", "a") not in replicas[0].log and replicas[0].state == ReplicaState.ready


def test_the_canary_reads_the_packaged_control_facts_and_refuses_a_missing_file(tmp_path) -> None:
    facts = load_control_facts(ServingSettings(serving_control_facts_n=50))
    packaged = json.loads(DEFAULT_CONTROL_FACTS_FILE.read_text())["facts"]
    assert [f.prompt for f in facts] == [f["prompt"] for f in packaged[:50]] and len(facts) > 8
    assert len(load_control_facts(ServingSettings())) == ServingSettings().serving_control_facts_n
    with pytest.raises(FileNotFoundError, match="serving_control_facts_path"):
        load_control_facts(ServingSettings(serving_control_facts_path=tmp_path / "gone.json"))
