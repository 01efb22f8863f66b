"""The streaming pipeline end to end on real Redis and a real local Ray cluster (tiny model, so it runs in seconds
per batch): every accepted edit reaches exactly one outcome, versions rebuild bit for bit, faults lose nothing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import ray
import torch

from controller.pipeline.runtime import start_controller, stop_controller
from shared.jobs import ValuesJob, WorkerConfig
from shared.outcomes import EditState
from shared.streams import EditStreams
from shared.weight_store import rebuild
from tests.pipeline_helpers import Probe, pipeline_settings, tiny_requests
from workers.edit_worker import EditWorker


def _submit(settings, requests) -> list:
    async def go():
        streams = EditStreams.from_url(settings.redis_url, settings.namespace)
        try:
            await streams.ensure_group()
            return [await streams.submit(r) for r in requests]
        finally:
            await streams.close()

    return asyncio.run(go())


def run_to_terminal(settings, probe, requests) -> dict[str, str]:
    """Submit ``requests``, run a controller until each has its terminal outcome, stop it; the final states."""
    _submit(settings, requests)
    actor, run_ref = start_controller(settings)
    try:
        return probe.wait_terminal([r.edit_id for r in requests])
    finally:
        stop_controller(actor, run_ref)


@pytest.fixture
def probe_factory():
    probes = []

    def make(settings) -> Probe:
        probes.append(Probe(settings))
        return probes[-1]

    yield make
    for probe in probes:
        probe.cleanup()


def _assert_exactly_once(probe: Probe, accepted: list[str]) -> None:
    """Every accepted edit: one terminal outcome on the stream; applied ones in exactly one committed manifest."""
    outcomes = probe.outcomes()
    per_edit = Counter(o.edit_id for o in outcomes)
    assert set(per_edit) == set(accepted), set(accepted) ^ set(per_edit)
    assert all(n == 1 for n in per_edit.values()), [e for e, n in per_edit.items() if n > 1]
    in_manifests = Counter(e for m in probe.committed_manifests() for e in m.edit_ids)
    assert all(n == 1 for n in in_manifests.values()), in_manifests.most_common(3)
    for outcome in outcomes:
        if outcome.state == EditState.applied:
            manifest = probe.store.manifest(outcome.version)
            assert outcome.edit_id in manifest.edit_ids
        else:
            assert outcome.edit_id not in in_manifests


def test_stream_to_versions_with_two_sharded_workers(ray_session, redis_url, tiny_model_dir, tmp_path,
                                                     probe_factory) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, n_edit_workers=2)
    probe = probe_factory(settings)
    requests = tiny_requests(9)
    same_fact_later = requests[0].model_copy(update={"edit_id": "e0-again", "target_new": "jazz"})
    results = _submit(settings, [*requests, same_fact_later, requests[1]])
    assert results[-1].duplicate and not any(r.duplicate for r in results[:-1])
    actor, run_ref = start_controller(settings)
    try:
        ids = [r.edit_id for r in [*requests, same_fact_later]]
        states = probe.wait_terminal(ids)
        assert set(states.values()) == {"applied"}
        status = ray.get(actor.status.remote())
    finally:
        final = stop_controller(actor, run_ref)
    assert final.state == "stopped"
    _assert_exactly_once(probe, ids)
    version_of = {o.edit_id: o.version for o in probe.outcomes()}
    assert version_of["e0-again"] > version_of["e0"]  # the later edit of one fact is applied after the earlier

    # Both workers hold the head version, bit-identical, and equal to the committed manifest.
    head = probe.head()
    assert [w.version for w in status.workers] == [head, head]
    assert status.workers[0].checksums == status.workers[1].checksums
    manifest = probe.store.manifest(head)
    assert all(status.workers[0].checksums[m.name] == m.sha256 for m in manifest.matrices)
    assert all(m.format == "lowrank" and m.rank <= settings.batch_max_size for m in manifest.matrices)

    # Rebuilding every version from the base model plus deltas reproduces its checksums bit for bit.
    worker = EditWorker(WorkerConfig(index=9, settings=settings.model_dump(mode="json")))
    for m in probe.committed_manifests():
        rebuilt = rebuild(probe.store, worker.base, m.version)  # verify=True checks every sha256
        assert set(rebuilt) >= {e.name for e in m.matrices}


def test_sharded_values_equal_unsharded(redis_url, tiny_model_dir, tmp_path) -> None:
    """v* of a batch computed in shards on two workers equals one unsharded computation."""
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url)
    config = WorkerConfig(index=0, settings=settings.model_dump(mode="json"))
    first = EditWorker(config)
    second = EditWorker(config.model_copy(update={"index": 1, "meta": first.meta}))
    requests = tiny_requests(6)
    whole = first.compute_values(ValuesJob(version=0, requests=requests))
    parts = [first.compute_values(ValuesJob(version=0, requests=requests[:3])),
             second.compute_values(ValuesJob(version=0, requests=requests[3:]))]
    torch.testing.assert_close(torch.cat([p.targets for p in parts]), whole.targets, rtol=1e-5, atol=1e-6)


def test_exactly_once_through_worker_kill_controller_restart_and_duplicates(
    ray_session, redis_url, tiny_model_dir, tmp_path, probe_factory
) -> None:
    # Long v* optimisations make each batch take seconds, so the faults land mid-batch.
    hparams = tmp_path / "slow.json"
    hparams.write_text((tiny_model_dir / "hparams.json").read_text().replace(
        '"v_num_grad_steps": 10', '"v_num_grad_steps": 1500, "v_early_stop_loss": 0.0'))
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, hparams_path=hparams, batch_max_size=3)
    probe = probe_factory(settings)
    requests = tiny_requests(12)
    _submit(settings, requests[:6])
    actor, run_ref = start_controller(settings)
    try:
        probe.wait_for(requests[0].edit_id, {"in_flight"})
        time.sleep(0.5)
        assert len(ray.get(actor.status.remote()).workers) == 1
        ray.get(actor.kill_worker.remote(0))  # ray.kill of the edit worker (its handle lives in the controller)
        _submit(settings, requests[6:] + requests[:3])  # new edits and duplicates while recovering
        probe.wait_for(requests[3].edit_id, {"in_flight"})
        time.sleep(0.5)
        ray.kill(actor, no_restart=False)  # the controller dies mid-batch; Ray restarts it and re-runs `run`
        _submit(settings, requests[3:6])
        states = probe.wait_terminal([r.edit_id for r in requests], timeout_s=300)
    finally:
        stop_controller(actor, run_ref)
    assert set(states.values()) == {"applied"}
    _assert_exactly_once(probe, [r.edit_id for r in requests])


def test_poison_entries_go_to_dead_letters_and_the_pipeline_keeps_flowing(
    ray_session, redis_url, tiny_model_dir, tmp_path, probe_factory
) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, claim_idle_s=0.5, janitor_interval_s=0.5,
                                 max_deliveries=3)
    probe = probe_factory(settings)
    good = tiny_requests(3)
    tag = "{" + settings.namespace + "}"
    # Entries a crashed consumer kept reading (3 deliveries) and never acknowledged...
    _submit(settings, good[:2])
    for reading in range(3):
        probe.redis.xreadgroup("controller", "ghost", {f"{tag}:edits": "0" if reading else ">"}, count=10)
    # ...and one that bypassed the door with a broken payload.
    probe.redis.xadd(f"{tag}:edits", {"edit_id": "broken", "request": '{"subject": "x"}'})
    _submit(settings, good[2:])
    actor, run_ref = start_controller(settings)
    try:
        states = probe.wait_terminal(["broken", *[r.edit_id for r in good]])
    finally:
        stop_controller(actor, run_ref)
    dead = {f["edit_id"]: f for f in probe.dead_letters()}
    assert dead["broken"]["reason_code"] == "invalid_payload" and "target_new" in dead["broken"]["reason"]
    assert states["broken"] == "failed"
    # The ghost had read e0 and e1 three times: both are dead-lettered with the delivery reason, e2 is applied.
    assert {e: states[e] for e in ("e0", "e1", "e2")} == {"e0": "failed", "e1": "failed", "e2": "applied"}
    assert dead["e1"]["reason_code"] == "max_deliveries" and "3 deliveries" in dead["e1"]["reason"]
    assert probe.redis.xpending(f"{tag}:edits", "controller")["pending"] == 0


def test_out_of_memory_batch_is_split_to_isolate_the_edit_that_cannot_fit(
    ray_session, redis_url, tiny_model_dir, tmp_path, probe_factory
) -> None:
    # A worker memory budget of 150 v* tokens: normal edits need ~25 each, the long one ~300 even alone.
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, worker_max_batch_tokens=150, batch_retries=2)
    probe = probe_factory(settings)
    requests = tiny_requests(4)
    long_prompt = "the city of " * 40 + "{} is located in"
    requests[2] = requests[2].model_copy(update={"prompt": long_prompt, "edit_id": "too-long"})
    states = run_to_terminal(settings, probe, requests)
    assert states == {"e0": "applied", "e1": "applied", "too-long": "failed", "e3": "applied"}
    failed = next(o for o in probe.outcomes() if o.edit_id == "too-long")
    assert failed.reason_code == "out_of_memory" and "EDITQ_WORKER_MAX_BATCH_TOKENS" in failed.reason
    _assert_exactly_once(probe, [r.edit_id for r in requests])


def test_the_consume_loop_survives_its_stream_vanishing(
    ray_session, redis_url, tiny_model_dir, tmp_path, probe_factory
) -> None:
    """An infrastructure error (here the edit stream deleted under the running controller, so its reads fail with
    NOGROUP) is reported and retried, not allowed to end the loop silently: later edits are still applied."""
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url)
    probe = probe_factory(settings)
    first, later = tiny_requests(2), tiny_requests(2, offset=2)
    _submit(settings, first)
    actor, run_ref = start_controller(settings)
    try:
        assert set(probe.wait_terminal([r.edit_id for r in first]).values()) == {"applied"}
        probe.redis.delete(f"{probe.tag}:edits")  # the stream and both consumer groups are gone

        async def submit_without_group():  # the door re-creates the stream, not the groups
            streams = EditStreams.from_url(settings.redis_url, settings.namespace)
            try:
                return [await streams.submit(r) for r in later]
            finally:
                await streams.close()

        asyncio.run(submit_without_group())
        states = probe.wait_terminal([r.edit_id for r in later], timeout_s=120)
        status = ray.get(actor.status.remote())
    finally:
        stop_controller(actor, run_ref)
    assert set(states.values()) == {"applied"}
    assert status.state == "running" and "NOGROUP" in (status.last_error or "")
