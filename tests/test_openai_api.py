"""The OpenAI-compatible API and `editq query` against in-process fake replicas (no Ray, no vLLM), driven by the
official `openai` client and the request shapes vLLM's benchmark client sends. Real engines: test_serving.py."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from controller.api.openai_api import build_openai_router, install_openai_errors
from tests.test_serving_logic import GOOD, PROBE, FakeReplica, router


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

    from controller.cli import query as query_cli

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

    from controller.cli import query as query_cli

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
