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
