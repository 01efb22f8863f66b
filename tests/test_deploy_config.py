"""Prometheus scrape config, alert rules and the Grafana dashboard parse, and every metric they query is declared in
``shared.metrics.SPECS`` with the right exposition suffix (promtool is not installed here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from shared.metrics import SPECS, Kind

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COLLAPSE_GAUGES = {
    "editq_sigma_max", "editq_condition_number", "editq_relative_drift_ratio", "editq_subspace_overlap_ratio",
    "editq_filtered_energy_ratio", "editq_canary_perplexity", "editq_control_fact_accuracy_ratio",
    "editq_edit_retention_ratio",
}
NAME = re.compile(r"\b((?:ray_)?editq_[a-z0-9_]+)")
LABEL_MATCH = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")


def _metric(token: str) -> tuple[str, str]:
    """Exposed series name -> (declared metric, suffix): Ray adds ``ray_``, prometheus-client adds ``_total`` to
    counters and ``_bucket``/``_sum``/``_count`` to histograms."""
    base = token.removeprefix("ray_")
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if base.endswith(suffix) and base.removesuffix(suffix) in SPECS:
            return base.removesuffix(suffix), suffix
    return base, ""


def _check_expr(expr: str) -> set[str]:
    names = set()
    for token in NAME.findall(expr):
        name, suffix = _metric(token)
        assert name in SPECS, f"{token!r} in {expr!r} is not a declared metric"
        kind = SPECS[name].kind
        if suffix == "" and f"{token}(_total)?" in expr:
            suffix = "_total"  # ray_x(_total)? regex matches either exposition
        allowed = {Kind.counter: {"_total"}, Kind.histogram: {"_bucket", "_sum", "_count"}, Kind.gauge: {""}}[kind]
        assert suffix in allowed, f"{token!r}: a {kind} is exposed with one of {allowed}"
        names.add(name)
    for label in LABEL_MATCH.findall(expr):
        if label not in {"__name__", "job"}:
            assert any(label in SPECS[n].labels for n in names), f"label {label!r} in {expr!r} is not declared"
    return names


def test_prometheus_scrapes_the_api_and_ray() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["editq-api"]
    assert api["metrics_path"] == "/metrics"
    assert any(t.endswith(":8000") for sc in api["static_configs"] for t in sc["targets"])
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    kuberay = (DEPLOY / "kuberay" / "raycluster.yaml")
    if kuberay.exists():  # the pod annotations the kubernetes job keeps are the ones the cluster sets
        assert 'prometheus.io/scrape: "true"' in kuberay.read_text()
    assert jobs["ray-kuberay"]["relabel_configs"][0]["regex"] == "true"


def test_alert_rules_parse_and_query_declared_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    seen: set[str] = set()
    alerts = [r for group in rules["groups"] for r in group["rules"]]
    assert len({r["alert"] for r in alerts}) == len(alerts)
    for rule in alerts:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        seen |= _check_expr(rule["expr"])
    # what the issue asks for: condition-number growth, perplexity up, control facts down, DLQ growing, queue lag
    for needed in ("editq_condition_number", "editq_canary_perplexity", "editq_control_fact_accuracy_ratio",
                   "editq_dead_letter_entries", "editq_queue_lag_entries"):
        assert needed in seen


def test_grafana_dashboard_shows_the_collapse_story() -> None:
    dash = json.loads((DEPLOY / "grafana" / "editq-dashboard.json").read_text())
    seen: set[str] = set()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")")
            seen |= _check_expr(target["expr"])
    assert seen >= COLLAPSE_GAUGES
    assert {"editq_outcomes", "editq_weight_version", "editq_live_version"} <= seen
    for layer_panel in (p for p in dash["panels"] if "by (layer)" in json.dumps(p.get("targets", []))):
        assert all(t["legendFormat"] == "{{layer}}" for t in layer_panel["targets"])
