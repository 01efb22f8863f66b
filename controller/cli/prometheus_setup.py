"""A ready Prometheus configuration for a local `editq up`: the API's /metrics (with a `metrics`-scope key) and the
Ray node's metrics export port (the ``ray_editq_*`` series recorded inside the actors), plus the alert rules.

Ray writes its own service-discovery file only when its dashboard runs, which `editq up` keeps off; so editq writes
the targets itself, under ``$EDITQ_HOME/prometheus/``:

    prometheus --config.file ~/.cache/editq/prometheus/prometheus.yml

The file is JSON (valid YAML, so no YAML writer is needed); ``deploy/prometheus/prometheus.yml`` is the same shape
for other setups.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("editq.prometheus")
ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def ray_metrics_port() -> int | None:
    """The local Ray node's Prometheus export port (None when Ray is not initialised here)."""
    import ray

    if not ray.is_initialized():
        return None
    node = ray._private.worker.global_worker.node  # the node this driver started or joined
    return int(node.metrics_export_port) if node is not None else None


def write_local_config(
    directory: Path, api: str, ray_metrics: str | None, api_key: str | None, scrape_interval_s: float = 15.0,
    alerts: Path | None = ALERTS,
) -> Path:
    """Write ``prometheus.yml`` (+ the key file, 0600) into ``directory``; returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    api_job: dict = {"job_name": "editq-api", "metrics_path": "/metrics", "static_configs": [{"targets": [api]}]}
    if api_key:
        key_file = directory / "editq-api-key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, even briefly
        with os.fdopen(fd, "w") as handle:
            handle.write(api_key)
        os.chmod(key_file, 0o600)
        api_job["authorization"] = {"type": "Bearer", "credentials_file": str(key_file)}
    jobs = [api_job]
    if ray_metrics:
        jobs.append({"job_name": "ray", "static_configs": [{"targets": [ray_metrics]}]})
    config: dict = {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s",
                   "external_labels": {"system": "editq"}},
        "scrape_configs": jobs,
    }
    if alerts is not None and alerts.exists():
        config["rule_files"] = [str(alerts)]
    elif alerts is not None:  # an install without deploy/: scraping still works, but say that no alert will fire
        log.warning("no alert rules at %s: Prometheus will scrape editq but evaluate no alerts", alerts)
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


async def prepare_local(settings) -> Path:
    """For `editq up`: the config under ``$EDITQ_HOME/prometheus`` with this run's ports; a `metrics`-scope key is
    created once (kept in the 0600 key file and reused while it still verifies)."""
    from controller.security.keys import KeyStore, Scope
    from shared.streams import EditStreams

    directory = settings.home / "prometheus"
    key = None
    if settings.auth and not settings.metrics_public:
        key_file = directory / "editq-api-key"
        streams = EditStreams.from_url(settings.redis_url, settings.namespace)
        try:
            store = KeyStore(streams.redis, settings.namespace)
            key = key_file.read_text().strip() if key_file.exists() else None
            if not key or await store.verify(key) is None:
                key, _ = await store.create("prometheus", [Scope.metrics], "controller")
        finally:
            await streams.close()
    port = ray_metrics_port()
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.api_host, settings.api_host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return write_local_config(directory, f"{host}:{settings.api_port}",
                              f"127.0.0.1:{port}" if port else None, key)
