"""Undo on demand: a revert is the joint solve of every live edit but the reverted ones (tiny model, exact), and end
to end through the real API, Redis, Ray workers and store: revert an edit, roll back to an earlier version, and keep
building -- with every version's number and files kept and every step in the audit trail."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from fastapi.testclient import TestClient

from shared.weight_store import LocalWeightStore, build_manifest
from tests.test_compaction import _editor
from tests.test_guards import REQUESTS
from workers.editing.compaction import LiveEdits, compact, live_edits


def _store_versions(editor, store: LocalWeightStore) -> None:
    parent = 0
    for version, batch in enumerate((REQUESTS[:1], REQUESTS[1:]), start=1):
        out = editor.apply(batch)
        store.put(build_manifest(version, parent, "tiny", out.edit_ids, "alphaedit", out.deltas, editor.checksums(),
                                 edits=list(batch)), out.deltas, out.aux)
        parent = version


def test_a_revert_is_the_joint_solve_without_the_reverted_edit(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    editor = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer)
    base = {layer: w.clone() for layer, w in editor.state.weights.items()}
    store = LocalWeightStore(tmp_path / "store")
    _store_versions(editor, store)
    gone = REQUESTS[0].edit_id
    live = live_edits(store, 2, exclude=[gone])
    assert [r.edit_id for r in live.requests] == [r.edit_id for r in REQUESTS[1:]]
    done = compact(editor, live, max_lost=None)
    store.put(build_manifest(3, 2, "tiny", [], "alphaedit", done.result.deltas, editor.checksums(), kind="revert",
                             reverted_edit_ids=[gone]), done.result.deltas, done.result.aux)
    assert gone not in [r.edit_id for r in live_edits(store, 3).requests]  # stays out of later compactions

    joint = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer, templates=editor.state.templates)
    joint.prepare()
    reader = joint.reader(live.requests)
    hp = joint.hparams
    solved = joint.solve_layers(live.requests, live.targets, {}, reader, reader.read(hp.layers[0], hp.layers[-1]))
    for delta, layer in zip(solved.deltas, hp.layers, strict=True):
        torch.testing.assert_close(editor.state.weights[layer], delta.apply(base[layer]), rtol=1e-6, atol=1e-6)


def test_reverting_every_edit_returns_the_base_weights(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    editor = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer)
    base = {layer: w.clone() for layer, w in editor.state.weights.items()}
    store = LocalWeightStore(tmp_path / "store")
    _store_versions(editor, store)
    live = live_edits(store, 2, exclude=[r.edit_id for r in REQUESTS])
    assert len(live) == 0
    done = compact(editor, live, max_lost=0)
    assert done.lost == [] and done.result.compacted and not editor.state.prev_keys_cov
    for layer, w in base.items():
        torch.testing.assert_close(editor.state.weights[layer], w, rtol=1e-6, atol=1e-6)
    follower = _editor(tmp_path, copy.deepcopy(tiny_llama), tiny_tokenizer, templates=editor.state.templates)
    for version in (1, 2):
        follower.apply_deltas(*store.deltas(version))
    follower.apply_deltas(done.result.deltas, done.result.aux)
    assert follower.checksums() == editor.checksums()
    with pytest.raises(ValueError, match="targets for"):
        compact(editor, LiveEdits(REQUESTS[:1], torch.zeros(2, 4)))


def _wait(condition, timeout_s: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_revert_and_rollback_through_the_pipeline(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    from controller.api.app import create_app
    from controller.pipeline.runtime import start_controller, stop_controller
    from tests.pipeline_helpers import Probe, admin_key, pipeline_settings, tiny_requests

    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, batch_max_size=3, retrieval_enabled=False)
    probe = Probe(settings)
    requests = tiny_requests(6)
    headers = {"Authorization": f"Bearer {admin_key(settings, 'ops')}"}
    actor, run_ref = start_controller(settings)
    try:
        with TestClient(create_app(settings), headers=headers) as c:
            for r in requests[:3]:
                assert c.post("/v1/edits", json=r.model_dump(mode="json")).status_code == 202
            probe.wait_terminal([r.edit_id for r in requests[:3]])
            first = probe.head()
            health = c.get("/healthz")
            assert health.status_code == 200 and health.json()["controller"] in ("starting", "running"), health.text
            for r in requests[3:5]:
                assert c.post("/v1/edits", json=r.model_dump(mode="json")).status_code == 202
            probe.wait_terminal([r.edit_id for r in requests[3:5]])
            second = probe.head()
            assert second > first >= 1

            in_weights = [r.edit_id for r in requests[:3]
                          if c.get(f"/v1/edits/{r.edit_id}").json().get("served_by") == "weights"]
            assert in_weights, "no edit landed in the weights"
            target = in_weights[0]
            assert c.post("/v1/edits/unknown-id:revert").status_code == 404
            assert c.post(f"/v1/edits/{target}:revert").status_code == 202
            _wait(lambda: c.get(f"/v1/edits/{target}").json().get("reverted_in") is not None, what="the revert")
            status = c.get(f"/v1/edits/{target}").json()
            revert = probe.store.manifest(status["reverted_in"])
            assert revert.kind == "revert" and revert.reverted_edit_ids == [target] and revert.parent == second
            assert status["reverted_by"].startswith("ops#") and status.get("served_by") is None
            assert c.post(f"/v1/edits/{target}:revert").status_code == 409  # once is enough

            assert c.post("/v1/admin/rollback", params={"to": 999}).status_code == 422
            assert c.post("/v1/admin/rollback", params={"to": first}).status_code == 202
            _wait(lambda: probe.head() == first, what="the rollback")
            versions = {v["version"]: v for v in c.get("/v1/weights").json()["versions"]}
            assert versions[second]["status"] == "reverted" and versions[revert.version]["status"] == "reverted"
            again = c.get(f"/v1/edits/{target}").json()  # its revert was discarded with its version: back in force
            assert again.get("reverted_in") is None and again["served_by"] == "weights"

            assert c.post("/v1/edits", json=requests[5].model_dump(mode="json")).status_code == 202
            probe.wait_terminal([requests[5].edit_id])
            newest = probe.head()
            assert newest > revert.version and probe.store.manifest(newest).parent == first  # a new number
            assert set(probe.store.versions()) >= {first, second, revert.version, newest}  # nothing deleted
            trail = [(e["action"], e.get("edit_id"), e.get("version")) for e in c.get("/v1/audit?count=1000").json()]
            assert ("revert_requested", target, None) in trail and ("reverted", target, revert.version) in trail
            assert ("rollback_requested", None, first) in trail and ("rolled_back_to", None, first) in trail
            assert ("version_reverted", None, second) in trail and ("revert_undone", target, None) in trail
            c.post("/v1/admin/pause")
            _wait(lambda: c.get("/healthz").json().get("controller") == "paused", 30, "the paused heartbeat")
    finally:
        stop_controller(actor, run_ref)
        probe.cleanup()
