"""Collapse metrics: per-matrix signals (properties), the model-level gauges, and the edit worker returning them in
``EditResult.metrics`` under ``metric_key`` names (and surfacing a guard rejection with its state unchanged)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.jobs import EditJob, WorkerConfig
from shared.metrics import metric_key, parse_metric_key
from shared.schemas import EditRequest
from shared.settings import Settings
from workers.evaluation.collapse import (
    CONTROL_FACTS,
    ControlFact,
    RetentionSample,
    control_fact_accuracy,
    load_control_facts,
    model_health,
)
from workers.guards import GuardRejection
from workers.guards.collapse import matrix_health, subspace_overlap
from workers.guards.revive import Spectrum


def test_matrix_health_of_the_pretrained_matrix_is_neutral() -> None:
    w = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    health = matrix_health(w, Spectrum.of(w), top_k=4)
    s = torch.linalg.svdvals(w.double())
    assert health.sigma_max == pytest.approx(float(s[0]))
    assert health.condition_number == pytest.approx(float(s[0] / s[-1]))
    assert health.relative_drift == pytest.approx(0.0, abs=1e-6)
    assert health.subspace_overlap == pytest.approx(1.0, abs=1e-9)


def test_matrix_health_sees_drift_and_rotation() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(10, 20, generator=gen, dtype=torch.float64)
    base = Spectrum.of(w0)
    scaled = matrix_health(2 * w0, base, top_k=3)  # same singular vectors, doubled values
    assert scaled.relative_drift == pytest.approx(1.0) and scaled.subspace_overlap == pytest.approx(1.0)
    assert scaled.condition_number == pytest.approx(matrix_health(w0, base).condition_number)
    # a huge update in fresh directions takes over the top of the spectrum
    u = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 3, generator=gen, dtype=torch.float64))[0]
    u = u - base.u[:, :3] @ (base.u[:, :3].T @ u)
    rotated = matrix_health(w0 + 100 * u @ v.T, base, top_k=3)
    assert rotated.subspace_overlap < 0.7 and rotated.sigma_max > 50


def test_subspace_overlap_is_mean_cos2_of_principal_angles() -> None:
    theta = 0.3
    a = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
    assert subspace_overlap(a, b) == pytest.approx(math.cos(theta) ** 2)
    # span(e1, e2) vs span(b, e3): b lies inside the first plane (angle 0), e3 is orthogonal to it (angle 90)
    two = torch.eye(3, dtype=torch.float64)[:, :2]
    other = torch.cat([b, torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)], 1)
    assert subspace_overlap(two, other) == pytest.approx(0.5)


def _req(i: int, subject: str = "france", target: str = "rome") -> EditRequest:
    return EditRequest(edit_id=f"e{i}", subject=subject, prompt=f"the capital {i} of {{}} is", target_new=target)


def test_retention_sample_is_bounded_deterministic_and_drops_superseded_edits() -> None:
    a, b = RetentionSample(capacity=5, seed=3), RetentionSample(capacity=5, seed=3)
    for start in range(0, 40, 8):
        batch = [_req(i) for i in range(start, start + 8)]
        a.add(batch)
        b.add(batch)
    assert len(a.items) == 5 and [r.edit_id for r in a.items] == [r.edit_id for r in b.items]
    kept = a.items[0]
    newer = EditRequest(edit_id="new", subject=kept.subject, prompt=kept.prompt, target_new="berlin")
    a.add([newer])
    assert kept.edit_id not in {r.edit_id for r in a.items}  # the newer fact replaces the older one
    a.clear()
    assert a.items == [] and a.retention(None, None) is None


def test_control_facts_file() -> None:
    facts = load_control_facts()
    assert 30 <= len(facts) <= 60
    assert len({f.prompt for f in facts}) == len(facts)
    assert json.loads(CONTROL_FACTS.read_text())["model"] == "SmolLM2-135M-Instruct"
    assert load_control_facts("SmolLM2-135M-Instruct") == facts and load_control_facts("tiny-model0") == []


def test_model_health_keys(tiny_llama, tiny_tokenizer) -> None:
    sample = RetentionSample()
    assert metric_key("editq_edit_retention_ratio") not in model_health(tiny_llama, tiny_tokenizer, [], sample)
    sample.add([_req(0)])
    facts = [ControlFact("the capital of france is", "paris")]
    out = model_health(tiny_llama, tiny_tokenizer, facts, sample, texts=["the city of paris"])
    assert set(out) == {"editq_canary_perplexity", "editq_control_fact_accuracy_ratio", "editq_edit_retention_ratio"}
    assert out["editq_canary_perplexity"] > 1 and 0 <= out["editq_control_fact_accuracy_ratio"] <= 1


@pytest.mark.slow
def test_base_smollm2_knows_every_control_fact(smollm2) -> None:
    model, tokenizer = smollm2
    assert control_fact_accuracy(model, tokenizer, load_control_facts()) == 1.0


# --- the edit worker (no Ray needed: a plain class) ---------------------------------------------------------------

WORKER_EDITS = [
    EditRequest(edit_id="w1", subject="france", prompt="the capital of {} is", target_new="rome", target_true="paris"),
    EditRequest(edit_id="w2", subject="bbc", prompt="{} works at", target_new="sega"),
]


def _worker(tmp_path, tiny_model_dir, **hparams):
    from workers.edit_worker import EditWorker

    hp = json.loads((tiny_model_dir / "hparams.json").read_text()) | hparams
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    settings = Settings(home=tmp_path / "home", model_path=tiny_model_dir, hparams_path=tmp_path / "hp.json",
                        device="cpu", torch_threads=1)
    worker = EditWorker(WorkerConfig(index=0, settings=settings.model_dump(mode="json")))
    worker.prepare()
    return worker


def test_edit_worker_returns_collapse_metrics(tmp_path, tiny_model_dir) -> None:
    worker = _worker(tmp_path, tiny_model_dir, guard="revive", revive_rank=2, guard_min_efficacy=0.0)
    first = worker.edit(EditJob(parent=0, version=1, requests=WORKER_EDITS[:1]))
    names = {parse_metric_key(k)[0] for k in first.metrics if parse_metric_key(k)}
    assert {"editq_sigma_max", "editq_condition_number", "editq_relative_drift_ratio",
            "editq_subspace_overlap_ratio", "editq_filtered_energy_ratio", "editq_canary_perplexity"} <= names
    assert metric_key("editq_relative_drift_ratio", layer=1) in first.metrics
    assert first.metrics[metric_key("editq_relative_drift_ratio", layer=1)] > 0
    assert metric_key("editq_edit_retention_ratio") not in first.metrics  # no earlier edits yet
    second = worker.edit(EditJob(parent=1, version=2, requests=WORKER_EDITS[1:]))
    assert 0.0 <= second.metrics[metric_key("editq_edit_retention_ratio")] <= 1.0
    assert all(math.isfinite(v) for v in second.metrics.values())


def test_edit_worker_surfaces_a_guard_rejection_unchanged(tmp_path, tiny_model_dir) -> None:
    worker = _worker(tmp_path, tiny_model_dir, guard="revive", revive_rank=32, guard_min_efficacy=1.0)
    before = worker.info()
    with pytest.raises(GuardRejection) as info:
        worker.edit(EditJob(parent=0, version=1, requests=WORKER_EDITS))
    assert info.value.reason == "collapse_risk" and info.value.edit_ids == ["w1", "w2"]
    after = worker.info()
    assert after.version == 0 and after.checksums == before.checksums
