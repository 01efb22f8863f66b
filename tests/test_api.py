"""The HTTP door on a real Redis: invalid edits get 422 naming the field and never enter the stream."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from controller.api.app import create_app
from shared.settings import Settings
from tests.pipeline_helpers import admin_key


@pytest.fixture
def client(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path)
    headers = {"Authorization": f"Bearer {admin_key(settings, 'tester')}"}
    with TestClient(create_app(settings), headers=headers) as c:
        yield c, settings
    r = Redis.from_url(redis_url)
    for key in r.scan_iter(match="{" + settings.namespace + "}:*"):
        r.delete(key)


def test_submit_status_and_idempotency(client) -> None:
    c, _ = client
    edit = {"edit_id": "ceo-1", "subject": "Acme", "prompt": "The CEO of {} is", "target_new": "Jane Doe"}
    first = c.post("/v1/edits", json=edit)
    assert first.status_code == 202 and first.json()["edit_id"] == "ceo-1" and not first.json()["duplicate"]
    again = c.post("/v1/edits", json=edit)
    assert again.status_code == 202 and again.json()["duplicate"]
    many = c.post("/v1/edits", json=[{"subject": "Acme", "prompt": "Acme is based in", "target_new": "Oslo"}])
    assert many.status_code == 202 and many.json()[0]["edit_id"].startswith("sha256:")
    status = c.get("/v1/edits/ceo-1").json()
    assert status["state"] == "queued" and status["stream_id"] == first.json()["stream_id"]
    assert c.get("/v1/edits/unknown").status_code == 404
    assert c.get("/v1/queue").json()["length"] == 2


@pytest.mark.parametrize(("edit", "field", "text"), [
    ({"subject": "Acme", "prompt": "The CEO of Globex is", "target_new": "Jane"}, "body", "subject"),
    ({"subject": "Acme", "prompt": "The CEO of {} is", "target_new": "  "}, "target_new", "at least 1"),
    ({"subject": "Acme", "prompt": "The CEO of {} is {}", "target_new": "Jane"}, "body", "exactly once"),
    ({"subject": "Acme", "prompt": "CEO of {}", "target_new": "x" * 201}, "target_new", "at most 200"),
    ({"subject": "Acme", "prompt": "The CEO of {} is", "target_new": "Jane", "colour": 1}, "colour", "Extra"),
])
def test_invalid_edits_are_rejected_at_the_door(client, edit, field, text) -> None:
    c, _ = client
    response = c.post("/v1/edits", json=edit)
    assert response.status_code == 422
    detail = str(response.json()["detail"])
    assert field in detail and text in detail
    assert c.get("/v1/queue").json()["length"] == 0
    assert "editq_edits_invalid_total 1.0" in c.get("/metrics").text


def test_metrics_endpoint_exposes_queue_state(client) -> None:
    c, _ = client
    c.post("/v1/edits", json={"subject": "Acme", "prompt": "The CEO of {} is", "target_new": "Jane"})
    text = c.get("/metrics").text
    assert 'editq_edits_submitted_total{source="tester"} 1.0' in text
    assert "editq_queue_lag_entries 1.0" in text and "editq_weight_version 0.0" in text


def test_metrics_exposes_each_series_once(client) -> None:
    """Two families of one name make Prometheus drop samples (the process's gauges vs the scrape-time ones)."""
    c, _ = client
    c.post("/v1/edits", json={"subject": "Acme", "prompt": "The CEO of {} is", "target_new": "Jane"})
    samples = [line.rsplit(" ", 1)[0] for line in c.get("/metrics").text.splitlines() if not line.startswith("#")]
    assert len(samples) == len(set(samples)), sorted(s for s in samples if samples.count(s) > 1)
    assert "editq_queue_lag_entries" in samples
