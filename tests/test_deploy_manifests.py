"""The KubeRay manifests parse, and every EDITQ_* variable they set is a real setting with a valid value."""

from __future__ import annotations

from pathlib import Path

import yaml

from shared.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_kuberay_manifests_parse_and_configmap_matches_settings(monkeypatch) -> None:
    docs = [d for f in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "ConfigMap", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"edit", "serve"}
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    fields = {f"EDITQ_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.worker_resources == {"edit": 1.0} and settings.n_edit_workers == 2


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_is_locked_down() -> None:
    docs = [d for f in sorted((DEPLOY / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds.count("NetworkPolicy") >= 2 and kinds.count("Secret") >= 2
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    exposed = {p["containerPort"] for c in _containers(cluster) for p in c.get("ports", [])}
    assert not exposed & {8265, 10001}  # no dashboard/Jobs API and no Ray Client port
    for container in _containers(cluster):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "editq-ray"
        assert env["EDITQ_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "editq-redis"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert "EDITQ_REDIS_URL" not in config and config["EDITQ_AUTH"] == "true"
    redis = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in redis["args"]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    redis_from = policies["editq-redis"]["spec"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"app": "editq"}}}]


def test_a_local_ray_cluster_runs_with_token_auth(tmp_path) -> None:
    """`editq up`'s local Ray cluster: every gRPC port listens on all interfaces in Ray 2.60, so token auth must be on;
    a client without the token is refused."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    script = (
        "import os, subprocess, sys, ray\n"
        "from controller.pipeline.runtime import init_ray\n"
        "init_ray(1)\n"
        "print('MODE', os.environ.get('RAY_AUTH_MODE'))\n"
        "gcs = ray.get_runtime_context().gcs_address\n"
        "intruder = {**{k: v for k, v in os.environ.items() if not k.startswith('RAY_')}, 'RAY_AUTH_MODE': 'token',\n"
        "            'RAY_AUTH_TOKEN': 'f' * 32}\n"
        "probe = subprocess.run([sys.executable, '-c', f'import ray; ray.init(address={gcs!r})'], env=intruder,\n"
        "                       capture_output=True, text=True, timeout=120)\n"
        "print('INTRUDER', probe.returncode, 'InvalidAuthToken' in probe.stderr or 'Authentication' in probe.stderr)\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240,
                          cwd=DEPLOY.parent)
    assert "MODE token" in done.stdout, done.stdout + done.stderr[-2000:]
    intruder = next(line for line in done.stdout.splitlines() if line.startswith("INTRUDER")).split()
    assert intruder[1] != "0" and intruder[2] == "True", done.stdout  # a wrong token is refused


def test_the_rayservice_is_the_raycluster_with_the_api_in_serve() -> None:
    """rayservice.yaml: zero-downtime upgrades (NewCluster), an application that imports and builds, deployments
    that exist, and a cluster that is raycluster.yaml's (no drift) without the `editq up` container."""
    import importlib

    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    cluster = yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()).__next__()
    assert service["kind"] == "RayService" and service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, builder = application["import_path"].split(":")
    built = getattr(importlib.import_module(module), builder)(application["args"])
    from ray.serve import Application

    assert isinstance(built, Application)
    from controller.api import serve_app

    assert {d["name"] for d in application["deployments"]} == {
        serve_app.EditqAPI.name, serve_app.ControllerHost.name}
    assert serve_config["http_options"]["port"] == 8000
    expected = cluster["spec"]
    head = expected["headGroupSpec"]["template"]["spec"]
    head["containers"] = [c for c in head["containers"] if c["name"] != "editq-api"]
    head["containers"][0]["ports"].append({"containerPort": 8000, "name": "serve"})
    assert service["spec"]["rayClusterConfig"] == expected
