"""Rollout gates, rollback, routing and the OpenAI-compatible API against in-process fake replicas (no Ray, no
vLLM): the decision logic in seconds. The real engines are exercised in test_serving.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from controller.openai_api import build_openai_router, install_openai_errors
from controller.rollout import RolloutManager
from controller.router import NoReplicaError, Router
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
    from controller.rollout import probes_from_requests
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


# ---- OpenAI-compatible API ------------------------------------------------------------------------------------
@pytest.fixture
def api() -> TestClient:
    replicas = [FakeReplica("a", version=GOOD), FakeReplica("b", version=0)]
    app = FastAPI()
    app.include_router(build_openai_router(lambda: router(replicas), "smol"))
    install_openai_errors(app)
    return TestClient(app)


def test_completion_reports_its_weight_version(api: TestClient) -> None:
    body = {"model": "smol", "prompt": PROBE.prompt, "max_tokens": 4, "temperature": 0}
    response = api.post("/v1/completions", json=body, headers={"X-Editq-Min-Version": "1"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["choices"][0]["text"] == " Sega, a company"
    assert data["editq"]["version"] == GOOD and response.headers["X-Editq-Version"] == str(GOOD)
    assert data["usage"]["total_tokens"] == 4


def test_min_version_nobody_has_is_a_clear_503(api: TestClient) -> None:
    response = api.post("/v1/completions", json={"prompt": "x", "min_version": 7})
    assert response.status_code == 503 and "version >= 7" in response.json()["error"]["message"]


def test_unknown_model_is_404(api: TestClient) -> None:
    assert api.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}).status_code == 404


def test_chat_streaming_is_server_sent_events(api: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "min_version": 1}
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["X-Editq-Version"] == str(GOOD)
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["editq"]["version"] for c in chunks} == {GOOD}


def test_versions_lists_every_replica(api: TestClient) -> None:
    data = api.get("/v1/versions").json()
    assert {(r["name"], r["version"], r["state"]) for r in data["replicas"]} == {("a", 1, "ready"), ("b", 0, "ready")}


# ---- editq query ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--stream"], ["--chat"], ["--chat", "--stream"]])
def test_query_cli_prints_the_answer_and_its_version(api: TestClient, monkeypatch, extra: list[str]) -> None:
    import typer
    from typer.testing import CliRunner

    from controller import query_cli

    monkeypatch.setattr(query_cli.httpx, "Client", lambda **_: api)
    cli = typer.Typer()
    cli.command("query")(query_cli.query)
    cli.command("noop")(lambda: None)  # a group, as in editq's CLI
    result = CliRunner().invoke(cli, ["query", PROBE.prompt, "--min-version", "1", "--url", "http://t", *extra])
    assert result.exit_code == 0, result.output
    assert ("Madrid" if "--chat" in extra else "Sega") in result.output
    assert f"weight version {GOOD}" in result.output


def test_query_cli_explains_an_unavailable_version(api: TestClient, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from controller import query_cli

    monkeypatch.setattr(query_cli.httpx, "Client", lambda **_: api)
    cli = typer.Typer()
    cli.command("query")(query_cli.query)
    cli.command("noop")(lambda: None)
    result = CliRunner().invoke(cli, ["query", "x", "--min-version", "9", "--url", "http://t"])
    assert result.exit_code == 1 and "version >= 9" in result.output


def test_the_openai_sdk_against_the_endpoint(api: TestClient) -> None:
    """The official `openai` client (not ours) over the real routes: completions with a prompt list and n, chat,
    streaming, stop, seed, and OpenAI-shaped errors for an unknown model and unsupported or unknown parameters."""
    import openai

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api, max_retries=0)
    done = client.completions.create(model="smol", prompt=[PROBE.prompt, "The capital of France is"], n=2,
                                     max_tokens=4, temperature=0, seed=7, stop=["\n"])
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert all("Sega" in c.text for c in done.choices[:2]) or all("BBC" in c.text for c in done.choices[:2])
    assert done.usage.completion_tokens == 4 and done.model == "smol"
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], n=3,
                                          max_tokens=4)
    assert len(chat.choices) == 3 and all(c.message.role == "assistant" for c in chat.choices)
    chunks = list(client.completions.create(model="smol", prompt=PROBE.prompt, max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="smol", prompt="x", logit_bias={"1": 5})
    assert unsupported.value.body["param"] == "logit_bias" and "not supported" in unsupported.value.body["message"]
    with pytest.raises(openai.BadRequestError) as echo_logprobs:
        client.completions.create(model="smol", prompt="x", echo=True, logprobs=1)
    assert echo_logprobs.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="smol", prompt="x", extra_body={"colour": "blue"})
    assert unknown.value.body["param"] == "colour"
    with pytest.raises(openai.BadRequestError) as streamed_n:
        client.completions.create(model="smol", prompt="x", n=2, stream=True)
    assert "n=1" in streamed_n.value.body["message"]
    # no-op values of unsupported parameters are accepted (clients send them by default)
    assert client.completions.create(model="smol", prompt="x", max_tokens=2, echo=False, logprobs=None,
                                     presence_penalty=0).choices


def test_what_vllms_benchmark_client_sends_is_accepted(api: TestClient) -> None:
    """`vllm bench serve` sends neutral sampling extras and asks for a final usage chunk when streaming."""
    body = {"model": "smol", "prompt": PROBE.prompt, "max_tokens": 4, "temperature": 0, "stream": True,
            "repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0, "stream_options": {"include_usage": True}}
    with api.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    for field, value in (("repetition_penalty", 0), ("top_k", -2), ("logprobs", 21), ("logprobs", True),
                         ("best_of", 2), ("response_format", {"type": "json_object"})):
        refused = api.post("/v1/completions", json={"model": "smol", "prompt": "x", field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, (field, refused.text)
    assert api.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}}
                    ).status_code == 400  # only with stream
    two = api.post("/v1/completions", json={"prompt": PROBE.prompt, "n": 2, "max_tokens": 2}).json()
    one = api.post("/v1/completions", json={"prompt": PROBE.prompt, "n": 1, "max_tokens": 2}).json()
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # a prompt counts once, not n times


def test_sampling_controls_reach_the_replica_and_logprobs_come_back_in_openais_shapes(api: TestClient) -> None:
    """Penalties, top_k/min_p, logprobs, top_logprobs and echo through the official `openai` client: each reaches
    the replica's request, and log-probabilities come back in the completions and the chat shapes."""
    import openai

    replicas = [FakeReplica("a", version=GOOD)]
    app = FastAPI()
    app.include_router(build_openai_router(lambda: router(replicas), "smol"))
    install_openai_errors(app)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=TestClient(app),
                           max_retries=0)
    done = client.completions.create(model="smol", prompt=PROBE.prompt, max_tokens=3, logprobs=2, echo=False,
                                     presence_penalty=0.5, frequency_penalty=-0.5, seed=3,
                                     extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    sent = replicas[0].requests[-1]
    assert (sent.presence_penalty, sent.frequency_penalty, sent.top_k, sent.min_p, sent.repetition_penalty,
            sent.logprobs) == (0.5, -0.5, 5, 0.1, 1.1, 2)
    lp = done.choices[0].logprobs
    assert lp.tokens == [" Sega,", " a", " company"] and lp.token_logprobs == [-0.5] * 3
    assert [len(top) for top in lp.top_logprobs] == [3, 3, 3]  # the sampled token plus the top 2, as OpenAI
    assert lp.text_offset == [0, 6, 8]
    echoed = client.completions.create(model="smol", prompt=PROBE.prompt, max_tokens=3, echo=True)
    assert echoed.choices[0].text == PROBE.prompt + " Sega, a company" and echoed.choices[0].logprobs is None
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Spain?"}],
                                          logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [" Madrid."] and len(content[0].top_logprobs) == 1
    assert content[0].bytes == list(b" Madrid.")
    plain = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Spain?"}])
    assert plain.choices[0].logprobs is None and replicas[0].requests[-1].logprobs is None
    with pytest.raises(openai.BadRequestError) as without:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert without.value.body["param"] == "top_logprobs"
    streamed = list(client.completions.create(model="smol", prompt=PROBE.prompt, max_tokens=3, stream=True,
                                              logprobs=0, echo=False))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == [" Sega,", " a", " company"] and offsets == [0, 6, 8]
    echo_stream = list(client.completions.create(model="smol", prompt=PROBE.prompt, max_tokens=3, stream=True,
                                                 echo=True))
    assert "".join(c.choices[0].text for c in echo_stream if c.choices) == PROBE.prompt + " Sega, a company"
    chat_stream = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}],
                                                      stream=True, logprobs=True, top_logprobs=2))
    assert [t.token for c in chat_stream if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == \
        [" Madrid."]


def test_a_rolling_restart_never_takes_the_last_ready_replica_out() -> None:
    from controller.upgrade import UpgradeRefused, rolling_restart

    replicas = [FakeReplica("a", version=GOOD), FakeReplica("b", version=GOOD)]
    replicas[1].state = ReplicaState.starting  # b cannot take a's traffic

    async def live() -> int:
        return GOOD

    with pytest.raises(UpgradeRefused, match="no ready replica"):
        asyncio.run(rolling_restart(replicas, live))
    assert ("restart", "a") not in replicas[0].log and replicas[0].state == ReplicaState.ready
