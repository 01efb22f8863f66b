"""Metric names and one small recording interface for every tier.

Names follow Prometheus practice: ``editq_`` prefix, base units in the name (``_seconds``, ``_bytes``, ``_ratio``),
``_total`` for counters (prometheus-client appends it), labels only for small fixed sets (never edit ids).
Inside Ray actors ``RayMetrics`` records through ``ray.util.metrics`` (exported by each node's metrics agent,
which prefixes ``ray_``); processes outside Ray (the HTTP API) use ``PrometheusMetrics``; tests use
``MemoryMetrics``. Code records through ``Metrics`` and never cares which.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Kind(StrEnum):
    counter = "counter"
    gauge = "gauge"
    histogram = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500)

SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in [
        # queue
        MetricSpec("editq_edits_submitted", Kind.counter, "Edits accepted at the door.", ("source",)),
        MetricSpec("editq_edits_invalid", Kind.counter, "Edits rejected at the door by validation."),
        MetricSpec("editq_queue_lag_entries", Kind.gauge, "Edit stream entries not yet read by the controller."),
        MetricSpec("editq_queue_pending_entries", Kind.gauge, "Entries read but not yet acknowledged."),
        MetricSpec("editq_dead_letters", Kind.counter, "Entries moved to the dead-letter stream.", ("reason",)),
        MetricSpec("editq_dead_letter_entries", Kind.gauge, "Length of the dead-letter stream."),
        # batches and outcomes
        MetricSpec("editq_batch_size_edits", Kind.histogram, "Edits per dispatched batch.", buckets=_SIZES),
        MetricSpec("editq_batch_duration_seconds", Kind.histogram, "Batch compute time (v*, solve, commit).",
                   ("stage",), _SECONDS),
        MetricSpec("editq_batch_failures", Kind.counter, "Failed batch attempts.", ("reason",)),
        MetricSpec("editq_edit_latency_seconds", Kind.histogram, "From submission to committed version.",
                   buckets=_SECONDS),
        MetricSpec("editq_outcomes", Kind.counter, "Terminal outcomes by state.", ("state",)),
        MetricSpec("editq_weight_version", Kind.gauge, "Newest committed weight version."),
        MetricSpec("editq_compactions", Kind.counter, "Compactions (all live edits re-solved on the base weights) "
                   "by outcome: committed or refused.", ("outcome",)),
        MetricSpec("editq_live_version", Kind.gauge, "Weight version the served model runs."),
        MetricSpec("editq_versions_pending_rollout", Kind.gauge,
                   "Committed versions on the head's lineage above the live one (waiting for their rollout)."),
        MetricSpec("editq_delta_bytes", Kind.histogram, "Stored bytes per version delta.",
                   buckets=(1e4, 1e5, 1e6, 1e7, 1e8, 1e9)),
        # serving
        MetricSpec("editq_swap_duration_seconds", Kind.histogram, "Generation pause while a replica swaps weights.",
                   ("replica",), _SECONDS),
        MetricSpec("editq_rollouts", Kind.counter, "Rollouts by result.", ("result",)),
        MetricSpec("editq_replica_version", Kind.gauge, "Weight version per replica.", ("replica",)),
        MetricSpec("editq_served_agreement_checks", Kind.counter,
                   "Served-vs-reference greedy checks (at start and after every swap) by result: agree, disagree, "
                   "error, unchecked (no reference stored).", ("replica", "result")),
        MetricSpec("editq_served_agreement_near_ties", Kind.counter,
                   "Probes whose served answer left the reference's at a near tie (counted as agreement).",
                   ("replica",)),
        MetricSpec("editq_served_disagreement_probes", Kind.gauge,
                   "Probes the replica answered unlike the reference in its latest check (0 = served is evaluated).",
                   ("replica",)),
        # collapse (per edited matrix, labelled by layer; and for the model)
        MetricSpec("editq_sigma_max", Kind.gauge, "Largest singular value of the edited matrix.", ("layer",)),
        MetricSpec("editq_condition_number", Kind.gauge, "sigma_max / sigma_min of the edited matrix.", ("layer",)),
        MetricSpec("editq_relative_drift_ratio", Kind.gauge, "||W - W0||_F / ||W0||_F.", ("layer",)),
        MetricSpec("editq_subspace_overlap_ratio", Kind.gauge,
                   "Mean cos^2 of principal angles between current and base top-k singular subspaces.", ("layer",)),
        MetricSpec("editq_filtered_energy_ratio", Kind.gauge,
                   "Share of the last update's energy removed by the REVIVE guard.", ("layer",)),
        MetricSpec("editq_guard_batch_efficacy_ratio", Kind.gauge,
                   "Efficacy of the last batch on its own prompts after the guard filtered it."),
        MetricSpec("editq_canary_perplexity", Kind.gauge, "Perplexity on the fixed canary text set."),
        MetricSpec("editq_control_fact_accuracy_ratio", Kind.gauge, "Accuracy on control facts the base model knows."),
        MetricSpec("editq_edit_retention_ratio", Kind.gauge, "Efficacy on a rolling sample of earlier edits."),
        # health budget (scored on every candidate version against the base model)
        MetricSpec("editq_general_kl", Kind.gauge,
                   "Mean next-token KL(base || served) on the mixed text, nats per token (top-32 + tail lower bound)."),
        MetricSpec("editq_top1_agreement_ratio", Kind.gauge, "Mixed-text positions whose argmax is the base's."),
        MetricSpec("editq_fact_retention_ratio", Kind.gauge, "Unedited facts the base model knew, still known."),
        MetricSpec("editq_fluency_entropy", Kind.gauge, "Weighted bi/tri-gram entropy of greedy generations (bits)."),
        # retrieval tier
        MetricSpec("editq_retrieval_entries", Kind.gauge, "Edits held in the retrieval tier."),
        MetricSpec("editq_retrieval_stale_seconds", Kind.gauge, "How long this replica's retrieval tier has "
                   "answered from its in-memory copy because Redis did not answer (0: in sync)."),
        MetricSpec("editq_retrieval_lookups", Kind.counter, "Retrieval lookups by result.", ("result",)),
        MetricSpec("editq_retrieval_latency_seconds", Kind.histogram, "Query-side retrieval time.",
                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)),
        MetricSpec("editq_edits_routed", Kind.counter,
                   "Edits by what serves them at their terminal outcome (weights, retrieval).", ("route",)),
    ]
}


class Metrics(Protocol):
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None: ...
    def set(self, name: str, value: float, **labels: str) -> None: ...
    def observe(self, name: str, value: float, **labels: str) -> None: ...


def _spec(name: str, kind: Kind) -> MetricSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}: declare it in shared/metrics.py")
    if spec.kind != kind:
        raise TypeError(f"{name} is a {spec.kind}, not a {kind}")
    return spec


class MemoryMetrics:
    """In-process recorder (tests, and the CLI's own summaries)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        _spec(name, Kind.counter)
        self.values[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        _spec(name, Kind.gauge)
        self.values[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        _spec(name, Kind.histogram)
        self.observations[(name, tuple(sorted(labels.items())))].append(value)

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)


class PrometheusMetrics:
    """prometheus-client metrics in one registry (for processes outside Ray, e.g. the HTTP API)."""

    def __init__(self, registry=None, kinds: frozenset[Kind] = frozenset(Kind)) -> None:
        """``kinds``: which metric kinds this process records itself (the HTTP API leaves gauges to its scrape-time
        collector: two families of one name would make Prometheus drop samples)."""
        import prometheus_client as pc

        self.registry = registry or pc.CollectorRegistry()
        self._metrics = {}
        for spec in (s for s in SPECS.values() if s.kind in kinds):
            if spec.kind == Kind.counter:
                metric = pc.Counter(spec.name, spec.doc, spec.labels, registry=self.registry)
            elif spec.kind == Kind.gauge:
                metric = pc.Gauge(spec.name, spec.doc, spec.labels, registry=self.registry)
            else:
                metric = pc.Histogram(spec.name, spec.doc, spec.labels, registry=self.registry, buckets=spec.buckets)
            self._metrics[spec.name] = metric

    def _child(self, name: str, kind: Kind, labels: dict[str, str]):
        spec = _spec(name, kind)
        metric = self._metrics[name]
        return metric.labels(**labels) if spec.labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, Kind.counter, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, Kind.gauge, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, Kind.histogram, labels).observe(value)


class RayMetrics:
    """``ray.util.metrics`` inside Ray actors; created lazily so importing this module needs no Ray."""

    def __init__(self) -> None:
        self._metrics: dict[str, object] = {}

    def _get(self, name: str, kind: Kind):
        spec = _spec(name, kind)
        if name not in self._metrics:
            from ray.util import metrics as rm

            if kind == Kind.counter:
                self._metrics[name] = rm.Counter(spec.name, spec.doc, tag_keys=spec.labels)
            elif kind == Kind.gauge:
                self._metrics[name] = rm.Gauge(spec.name, spec.doc, tag_keys=spec.labels)
            else:
                self._metrics[name] = rm.Histogram(spec.name, spec.doc, list(spec.buckets), tag_keys=spec.labels)
        return self._metrics[name]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._get(name, Kind.counter).inc(value, tags=labels or None)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._get(name, Kind.gauge).set(value, tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._get(name, Kind.histogram).observe(value, tags=labels or None)


def default_metrics() -> Metrics:
    """``RayMetrics`` inside a Ray actor (exported by the node's agent), else an in-memory recorder."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            return RayMetrics()
    except Exception:
        pass
    return MemoryMetrics()


def metric_key(name: str, **labels: str | int) -> str:
    """Flat key for a labelled value in a JSON dict (version manifests): ``editq_sigma_max|layer=4``."""
    if name not in SPECS:
        raise KeyError(f"unknown metric {name!r}: declare it in shared/metrics.py")
    return "|".join([name, *(f"{k}={v}" for k, v in sorted(labels.items()))])


def parse_metric_key(key: str) -> tuple[str, dict[str, str]] | None:
    """Inverse of ``metric_key``; None for keys that are not declared metrics (plain manifest numbers)."""
    name, *pairs = key.split("|")
    if name not in SPECS:
        return None
    return name, dict(p.split("=", 1) for p in pairs)
