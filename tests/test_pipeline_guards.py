"""The guard and the collapse metrics inside the running pipeline: a refused batch ends in `rejected/collapse_risk`
outcomes (never silence), and a real /metrics endpoint shows the collapse gauges move as versions are committed."""

from __future__ import annotations

import json
import re

import pytest

from controller.pipeline.runtime import start_controller, stop_controller
from tests.pipeline_helpers import Probe, ServedAPI, pipeline_settings, tiny_requests
from tests.test_pipeline import run_to_terminal


def _hparams(tiny_model_dir, tmp_path, **extra) -> str:
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps({**json.loads((tiny_model_dir / "hparams.json").read_text()), **extra}))
    return path


def test_guard_rejection_becomes_collapse_risk_outcomes(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    # Protect 99.9% of every matrix's spectral energy and demand that every edit still takes: the guard must refuse.
    hparams = _hparams(tiny_model_dir, tmp_path, guard="revive", revive_energy=0.999, guard_min_efficacy=1.0)
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, hparams_path=hparams)
    probe = Probe(settings)
    requests = tiny_requests(4)
    try:
        states = run_to_terminal(settings, probe, requests)
        assert set(states.values()) == {"rejected"}
        outcomes = probe.outcomes()
        assert len(outcomes) == len(requests)
        assert all(o.reason_code == "collapse_risk" and "collapse guard" in o.reason for o in outcomes)
        assert probe.head() == 0  # nothing was committed
    finally:
        probe.cleanup()


def _gauges(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}\{{layer="(\d+)"\}} (\S+)$', text, re.M)}


@pytest.fixture
def served_api(redis_url, tiny_model_dir, tmp_path):
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, batch_max_size=3)
    api = ServedAPI(settings)
    yield settings, api
    api.close()
    Probe(settings).cleanup()


def test_metrics_endpoint_shows_collapse_gauges_move(ray_session, served_api) -> None:
    settings, api = served_api
    probe = Probe(settings)
    before = api.client.get("/metrics").text
    assert "editq_weight_version 0.0" in before and not _gauges(before, "editq_relative_drift_ratio")

    requests = tiny_requests(6)

    def post(batch) -> None:  # through the real HTTP door
        for request in batch:
            assert api.client.post("/v1/edits", json=json.loads(request.model_dump_json())).status_code == 202

    post(requests[:3])
    actor, run_ref = start_controller(settings)
    try:
        probe.wait_terminal([r.edit_id for r in requests[:3]])
        first = api.client.get("/metrics").text
        assert "editq_weight_version 1.0" in first
        post(requests[3:])
        probe.wait_terminal([r.edit_id for r in requests])
    finally:
        stop_controller(actor, run_ref)
    after = api.client.get("/metrics").text
    assert probe.head() == 2 and "editq_weight_version 2.0" in after
    drift_1, drift_2 = _gauges(first, "editq_relative_drift_ratio"), _gauges(after, "editq_relative_drift_ratio")
    assert set(drift_2) == {"1", "2"} and all(v > 0 for v in drift_2.values())
    assert all(drift_2[k] != drift_1[k] for k in drift_2)  # the gauges follow the newest version
    assert set(_gauges(after, "editq_sigma_max")) == {"1", "2"}
    assert set(_gauges(after, "editq_subspace_overlap_ratio")) == {"1", "2"}
    assert re.search(r"^editq_canary_perplexity \d", after, re.M)
