"""Hostile input at the HTTP door (real app, real Redis): every case gets a clear 4xx that names the field, and
nothing is stored."""

from __future__ import annotations

import uuid

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import Redis

from controller.api.app import create_app
from controller.rollout.rolling import mentions
from shared.settings import Settings
from tests.pipeline_helpers import admin_key

EDIT = {"subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "Jane Doe"}


@pytest.fixture
def door(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path,
                        max_body_bytes=64 * 1024, max_edits_per_request=100)
    headers = {"Authorization": f"Bearer {admin_key(settings, 'fuzzer')}"}
    with TestClient(create_app(settings), headers=headers) as c:
        yield c, settings
    r = Redis.from_url(redis_url)
    for key in r.scan_iter(match="{" + settings.namespace + "}:*"):
        r.delete(key)


def _stored(settings: Settings) -> int:
    r = Redis.from_url(settings.redis_url)
    edits = "{" + settings.namespace + "}:edits"
    return r.xlen(edits) if r.exists(edits) else 0


def test_oversize_bodies_answer_413(door) -> None:
    c, settings = door
    big = {**EDIT, "paraphrase_prompts": ["x" * 400] * 32, "target_new": "y" * 200}
    response = c.post("/v1/edits", json=[big] * 20)  # ~260 kB declared
    assert response.status_code == 413 and response.json()["detail"][0]["loc"] == ["body"]

    def chunks():  # no Content-Length: counted while it streams
        yield b"["
        for _ in range(200):
            yield (b'{"subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "' + b"z" * 1000 + b'"},')
        yield b"{}]"

    streamed = c.post("/v1/edits", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert _stored(settings) == 0


def test_long_lists_and_empty_lists(door) -> None:
    c, settings = door
    tiny = [{"subject": f"S{i}", "prompt": "{} is", "target_new": "x"} for i in range(101)]
    too_many = c.post("/v1/edits", json=tiny)
    assert too_many.status_code == 413 and "at most 100 edits" in too_many.text
    flood = c.post("/v1/edits", json=[EDIT] * 10_000)  # 10k items: refused by size before parsing
    assert flood.status_code == 413
    empty = c.post("/v1/edits", json=[])
    assert empty.status_code == 422 and "empty" in empty.text
    twice = c.post("/v1/edits", json=[{**EDIT, "edit_id": "same"}, {**EDIT, "edit_id": "same", "target_new": "B"}])
    assert twice.status_code == 422 and "edit_id" in twice.text
    assert _stored(settings) == 0


@pytest.mark.parametrize(("edit", "field", "text"), [
    ({**EDIT, "target_new": "Jane\x07Doe"}, "target_new", "control character"),
    ({**EDIT, "subject": "Acme\u202eevil"}, "subject", "U+202E"),
    ({**EDIT, "prompt": "The CEO of {} is \u2066x\u2069"}, "prompt", "bidirectional"),
    ({**EDIT, "subject": "the", "prompt": "{} CEO is"}, "body", "stopword"),
    ({**EDIT, "subject": "e", "prompt": "{} is"}, "body", "at least 2 characters"),
    ({**EDIT, "subject": "--", "prompt": "{} is"}, "body", "letter or digit"),
    ({**EDIT, "subject": "ran", "prompt": "The capital of Iran is"}, "body", "whole words"),
    ({**EDIT, "neighborhood_prompts": [{"prompt": "x", "target": "y"}] * 33}, "neighborhood_prompts", "at most 32"),
    ({**EDIT, "edit_id": "a b"}, "edit_id", "pattern"),
    ({**EDIT, "edit_id": "x" * 129}, "edit_id", "at most 128"),
])
def test_bad_fields_are_named(door, edit, field, text) -> None:
    c, settings = door
    response = c.post("/v1/edits", json=edit)
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    assert field in detail and text in detail
    assert _stored(settings) == 0


def test_a_subject_written_out_is_replaced_as_whole_words(door) -> None:
    c, _ = door
    ok = c.post("/v1/edits", json={**EDIT, "edit_id": "iran", "subject": "Iran", "prompt": "Iranians say Iran is"})
    assert ok.status_code == 202
    assert c.get("/v1/edits/iran").json()["state"] == "queued"
    stored = Redis.from_url(c.app.state.settings.redis_url, decode_responses=True).hget(
        "{" + c.app.state.settings.namespace + "}:edit:iran", "request")
    assert '"prompt":"Iranians say {} is"' in stored
    assert mentions("What is Iran's capital?", "Iran") and not mentions("Iranians travel", "Iran")
    assert not mentions("The weather is fine", "e")  # a stray letter cannot empty the control-fact gate


def test_reused_edit_id_with_other_content_is_409(door) -> None:
    c, settings = door
    assert c.post("/v1/edits", json={**EDIT, "edit_id": "id-1"}).status_code == 202
    assert c.post("/v1/edits", json={**EDIT, "edit_id": "id-1"}).json()["duplicate"] is True
    clash = c.post("/v1/edits", json={**EDIT, "edit_id": "id-1", "target_new": "Somebody Else"})
    assert clash.status_code == 409 and "id-1" in clash.text
    mixed = c.post("/v1/edits", json=[{**EDIT, "edit_id": "id-2", "target_new": "New"},
                                      {**EDIT, "edit_id": "id-1", "target_new": "Other"}])
    assert mixed.status_code == 409
    assert _stored(settings) == 1 and c.get("/v1/edits/id-2").status_code == 404


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/outcomes?count=0", "count"), ("/v1/outcomes?count=100000", "count"), ("/v1/outcomes?after=foo", "after"),
    ("/v1/outcomes?after=1-2-3", "after"), ("/v1/weights?limit=0", "limit"), ("/v1/weights?limit=-5", "limit"),
    ("/v1/audit?count=0", "count"), ("/v1/audit?action=drop_tables", "action"),
    ("/v1/edits/" + "x" * 200, "edit_id"),
])
def test_out_of_range_query_parameters_are_422(door, path, field) -> None:
    c, _ = door
    response = c.get(path)
    assert response.status_code == 422, (path, response.status_code, response.text)
    assert field in str(response.json()["detail"])


def test_a_chunked_body_cannot_hide_behind_a_small_content_length(redis_url, tmp_path) -> None:
    """Content-Length: 5 plus chunked framing (h11 frames it as chunked): the real bytes are counted -> 413."""
    import socket
    import threading
    import time

    import uvicorn

    from controller.pipeline.runtime import _free_port

    settings = Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path,
                        max_body_bytes=1024, auth=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, http="h11",
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        payload = b'{"subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "' + b"z" * 5000 + b'"}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        head = (b"POST /v1/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(head + chunked)
            reply = conn.recv(4096).decode(errors="replace")
        status = int(reply.split()[1])
        assert status in (400, 413), reply  # refused either way: never parsed by the app
        r = Redis.from_url(redis_url)
        assert not r.exists("{" + settings.namespace + "}:edits") or r.xlen("{" + settings.namespace + "}:edits") == 0
    finally:
        server.should_exit = True


def test_secrets_in_redis_urls_are_redacted() -> None:
    from shared.settings import redacted_url

    assert redacted_url("redis://:s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert redacted_url("rediss://user:s3cret@h/0") == "rediss://***@h/0"
    assert "s3cret" not in redacted_url("redis://h:6379/0?password=s3cret")
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_full_retrieval_tier_refuses_new_edits_at_the_door(redis_url, tmp_path) -> None:
    settings = Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path,
                        retrieval_max_entries=2)
    r = Redis.from_url(redis_url)
    r.hset(f"{settings.retrieval_prefix()}:entries", mapping={"a": "{}", "b": "{}"})  # two edits held
    headers = {"Authorization": f"Bearer {admin_key(settings, 'feeder')}"}
    try:
        with TestClient(create_app(settings), headers=headers) as c:
            full = c.post("/v1/edits", json=EDIT)
            assert full.status_code == 503 and "at capacity" in full.text and full.headers["retry-after"]
            assert _stored(settings) == 0
            r.hdel(f"{settings.retrieval_prefix()}:entries", "a")
            assert c.post("/v1/edits", json=EDIT).status_code == 202
    finally:
        for key in r.scan_iter(match="{" + settings.namespace + "}:*"):
            r.delete(key)


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ["x"] * 65}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": "x", "max_tokens": 100_000},
                                                                      "max_tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": "x" * 32_001}, "prompt"),
])
def test_openai_requests_are_bounded(body, field) -> None:
    from controller.api.openai_api import build_openai_router

    app = FastAPI()
    app.include_router(build_openai_router(lambda: None, "smol"))  # refused before any replica is asked
    with TestClient(app) as c:
        response = c.post("/v1/completions", json=body)
        assert response.status_code == 422 and field in str(response.json()["detail"])
