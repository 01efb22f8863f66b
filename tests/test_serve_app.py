"""editq as a Ray Serve application (controller/api/serve_app.py, what deploy/kuberay/rayservice.yaml runs) on the local
Ray cluster: Serve's proxy answers the real API, the controller host starts the controller, an edit submitted over
HTTP through Serve is applied, and Serve's health check follows the controller."""

from __future__ import annotations

import time

import httpx
import pytest

from controller.pipeline.runtime import _free_port
from tests.pipeline_helpers import Probe, admin_key, pipeline_settings, tiny_requests

pytestmark = pytest.mark.slow


def test_the_serve_application_takes_edits_through_serves_proxy(ray_session, redis_url, tiny_model_dir,
                                                                tmp_path) -> None:
    from ray import serve

    from controller.api.serve_app import build

    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, serving_replicas=0, retrieval_enabled=False)
    env = {f"EDITQ_{k.upper()}": str(v) for k, v in settings.model_dump(mode="json").items()
           if k in ("home", "model_path", "hparams_path", "device", "redis_url", "namespace", "worker_num_cpus",
                    "batch_max_size", "batch_max_wait_s", "serving_replicas", "retrieval_enabled", "torch_threads")}
    with pytest.raises(ValueError, match="unknown argument"):
        build({"redis_url": "x"})  # settings go by their EDITQ_ names only
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    probe = Probe(settings)
    try:
        serve.run(build({**env, "api_replicas": "1"}), name="editq", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {admin_key(settings, 'serve-test')}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            edits = tiny_requests(3)
            answer = http.post("/v1/edits", json=[e.model_dump(mode="json") for e in edits])
            assert answer.status_code == 202, answer.text
            assert http.post("/v1/edits", json={"subject": "x"}).status_code == 422  # the same door, through Serve
            assert httpx.get(f"{base}/v1/weights").status_code == 401  # no key, no answer
            states = probe.wait_terminal([e.edit_id for e in edits], timeout_s=300)
            assert set(states.values()) == {"applied"}
            deadline = time.monotonic() + 30
            while (health := http.get("/healthz")).json().get("controller") != "running":
                assert time.monotonic() < deadline, health.text
                time.sleep(0.5)
            assert health.status_code == 200
        status = serve.status().applications["editq"]
        assert status.status == "RUNNING"
        assert {"ControllerHost", "EditqAPI"} <= set(status.deployments)
    finally:
        serve.delete("editq")
        serve.shutdown()
        probe.cleanup()
