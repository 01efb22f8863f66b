"""Prometheus for real: `promtool` unit-tests every alert rule, and a real `prometheus` server scrapes the editq API
(with a `metrics`-scope key) and the Ray node's metrics port, as `editq up`'s generated config tells it to; the
queue, version and `ray_editq_*` series arrive and every alert rule evaluates.

Needs Debian's `prometheus` package (prometheus + promtool; `.ci/run` installs it when missing).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import uvicorn
from redis import Redis

from controller.api.app import create_app
from controller.cli.prometheus_setup import ALERTS, ray_metrics_port, write_local_config
from controller.security.keys import Scope
from shared.settings import Settings
from tests.test_security import _key

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="Debian's prometheus package is not installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_promtool_unit_tests_cover_every_alert() -> None:
    import yaml

    done = subprocess.run(["promtool", "test", "rules", str(DEPLOY / "alerts_test.yml")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert alerts == tested, alerts ^ tested
    fires = [t for case in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
             for t in case["alert_rule_test"] if t["exp_alerts"]]
    assert {t["alertname"] for t in fires} == alerts  # each alert is shown firing, not only silent


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())["data"]["result"]


def test_a_real_prometheus_scrapes_the_api_and_ray(ray_session, redis_url, tmp_path) -> None:
    from shared.metrics import default_metrics

    settings = Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path,
                        api_port=_free_port())
    api_port = settings.api_port
    scraper, _ = _key(settings, "prometheus", [Scope.metrics])
    admin, _ = _key(settings, "ops", [Scope.admin])
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=api_port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()

    @ray_session.remote(num_cpus=0)
    class Recorder:  # an actor records editq metrics the way the controller and workers do
        def record(self) -> None:
            default_metrics().inc("editq_outcomes", 3, state="applied")

    recorder = Recorder.remote()
    ray_session.get(recorder.record.remote())
    port = ray_metrics_port()
    assert port, "the Ray node exports no metrics port"
    config = write_local_config(tmp_path / "prom", f"127.0.0.1:{api_port}", f"127.0.0.1:{port}", scraper,
                                scrape_interval_s=1)
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    web = _free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{web}"
    try:
        while not server.started:
            time.sleep(0.05)
        import httpx

        httpx.post(f"http://127.0.0.1:{api_port}/v1/edits", headers={"Authorization": f"Bearer {admin}"},
                   json={"subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "Jane Doe"})
        wanted = {"api_up": 'up{job="editq-api"} == 1', "ray_up": 'up{job="ray"} == 1',
                  "queue": "editq_queue_lag_entries == 1",  # the edit submitted above waits in the queue
                  "version": "editq_weight_version",
                  "pending": "editq_versions_pending_rollout", "submitted": "editq_edits_submitted_total",
                  # Ray labels each series by the process that recorded it, and earlier tests in this Ray session
                  # record too, so the Recorder's 3 is read from the sum over processes
                  "ray_editq": 'sum(ray_editq_outcomes_total{state="applied"}) >= 3'}
        found: dict[str, list] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(found) < len(wanted):
            for name, promql in wanted.items():
                if name not in found:
                    try:
                        result = _query(base, promql)
                    except OSError:
                        result = []
                    if result:
                        found[name] = result
            time.sleep(1)
        assert set(found) == set(wanted), f"missing: {set(wanted) - set(found)}"
        assert float(found["ray_editq"][0]["value"][1]) >= 3.0
        assert float(found["submitted"][0]["value"][1]) >= 1.0
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as reply:
            groups = json.loads(reply.read())["data"]["groups"]
        deadline = time.monotonic() + 30
        rules = [r for g in groups for r in g["rules"]]
        while time.monotonic() < deadline and not all(r.get("lastEvaluation", "").startswith("2") for r in rules):
            time.sleep(1)
            with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as reply:
                rules = [r for g in json.loads(reply.read())["data"]["groups"] for r in g["rules"]]
        assert len(rules) >= 14 and all(r["health"] == "ok" for r in rules), [
            (r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        server.should_exit = True
        r = Redis.from_url(redis_url)
        for key in r.scan_iter(match="{" + settings.namespace + "}:*"):
            r.delete(key)
