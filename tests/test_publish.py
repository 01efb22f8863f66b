"""What happens after a commit when a serving tier exists: edits become `applied` only once their version is live,
`rolled_back` (with the failed gate) when the canary refuses it, and the head returns to the served version."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from controller.pipeline.publish import Publisher
from controller.rollout.rolling import RolloutResult
from shared.metrics import MemoryMetrics
from shared.outcomes import EditOutcome, EditState, ReasonCode, Route
from shared.schemas import EditRequest
from shared.streams import EditStreams, Finished
from shared.weight_store import LocalWeightStore


class StubRollout:
    def __init__(self, *statuses: str, previous: int | None = None) -> None:
        self.statuses = list(statuses)
        self.previous = previous  # the version the replicas serve (default: the one below the deployed one)
        self.deployed: list[tuple[int, int]] = []

    async def deploy(self, version, probes=()):
        self.deployed.append((version, len(probes)))
        status = self.statuses.pop(0)
        reason = "probe gate failed on r0: 0/2 edits answer target_new" if status != "live" else None
        previous = version - 1 if self.previous is None else self.previous
        return RolloutResult(version=version, previous=previous, status=status, reason=reason)


class StubPool:
    def __init__(self) -> None:
        self.synced: list[int] = []

    async def sync(self, version: int) -> None:
        self.synced.append(version)


REQUESTS = [EditRequest(edit_id=f"p{i}", subject="France", prompt=f"The capital {i} of {{}} is", target_new="Lyon")
            for i in range(2)]


def _run(redis_url, tmp_path, rollout: StubRollout, steps, retire=None, metrics=None):
    async def go():
        streams = EditStreams.from_url(redis_url, f"test-{uuid.uuid4().hex[:10]}")
        pool = StubPool()
        store = LocalWeightStore(tmp_path)
        publisher = Publisher(streams, pool, store, metrics or MemoryMetrics(), rollout, retire)
        try:
            await streams.ensure_group()
            for r in REQUESTS:
                await streams.submit(r)
            committed = [Finished(EditOutcome(edit_id=r.edit_id, state=publisher.commit_state, version=1), None)
                         for r in REQUESTS]
            await streams.finish(committed, expect_head=0, new_head=1)
            results = [await step(publisher) for step in steps]
            states = await streams.statuses([r.edit_id for r in REQUESTS])
            return results, states, await streams.outcomes(), await streams.head(), pool.synced
        finally:
            await streams.delete_namespace()
            await streams.close()

    return asyncio.run(go())


def test_edits_are_applied_only_when_their_version_is_live(redis_url, tmp_path) -> None:
    rollout = StubRollout("live")
    results, states, outcomes, head, synced = _run(
        redis_url, tmp_path, rollout, [lambda p: p.publish(1, REQUESTS)]
    )
    assert results == ["live"] and rollout.deployed == [(1, 2)]
    assert {s.state for s in states.values()} == {EditState.applied}
    assert [o.state for _, o in outcomes] == [EditState.applied, EditState.applied] and head == 1
    # The workers computed the version and already hold it (they may be computing the next batch on it now, while
    # this rollout runs): a successful rollout never moves them.
    assert synced == []


def test_a_refused_version_rolls_its_edits_back_and_the_head_with_them(redis_url, tmp_path) -> None:
    results, states, outcomes, head, synced = _run(
        redis_url, tmp_path, StubRollout("rolled_back"), [lambda p: p.publish(1, REQUESTS)]
    )
    assert results == ["rolled_back"]
    assert all(s.state == EditState.rolled_back and s.reason_code == "rollout" for s in states.values())
    assert "probe gate failed" in outcomes[0][1].reason
    assert head == 0 and synced == [0]  # the next batch is computed on the weights the replicas serve


@pytest.mark.parametrize("later", ["live", "rolled_back"])
def test_a_skipped_rollout_waits_and_resumes(redis_url, tmp_path, later) -> None:
    (tmp_path / "v00000001").mkdir()
    (tmp_path / "v00000001" / "manifest.json").write_text(
        '{"version": 1, "parent": 0, "base_model": "m", "edit_ids": ["p0", "p1"], "algo": "memit", "matrices": []}'
    )
    rollout = StubRollout("skipped", later)
    results, states, outcomes, _, _ = _run(
        redis_url, tmp_path, rollout, [lambda p: p.publish(1, REQUESTS), lambda p: p.resume()]
    )
    assert results == ["pending", later]
    assert rollout.deployed == [(1, 2), (1, 2)]  # the resumed rollout probes the same edits, read back from Redis
    expected = {"live": "applied", "rolled_back": "rolled_back"}[later]
    assert len(outcomes) == 2 and {s.state.value for s in states.values()} == {expected}


class TierStub:
    def __init__(self) -> None:
        self.retired: list[str] = []

    async def __call__(self, edit_ids: list[str]) -> int:
        self.retired.extend(edit_ids)
        return len(edit_ids)


def test_an_edit_that_did_not_take_stays_in_the_tier_with_reason_efficacy(redis_url, tmp_path) -> None:
    tier, metrics, rollout = TierStub(), MemoryMetrics(), StubRollout("live")
    results, states, outcomes, _, _ = _run(
        redis_url, tmp_path, rollout, [lambda p: p.publish(1, REQUESTS, missed=["p1"])], tier, metrics
    )
    assert results == ["live"] and tier.retired == ["p0"]  # only the edit that took leaves the tier
    assert rollout.deployed == [(1, 1)]  # and only it is probed on the canary
    assert states["p0"].state == EditState.applied and states["p0"].served_by == Route.weights
    assert states["p0"].reason_code is None
    missed = states["p1"]
    assert missed.state == EditState.applied and missed.version == 1
    assert missed.reason_code == ReasonCode.efficacy and missed.served_by == Route.retrieval
    assert "retrieval tier keeps serving it" in missed.reason
    assert len(outcomes) == 2
    assert metrics.get("editq_edits_routed", route="weights") == 1
    assert metrics.get("editq_edits_routed", route="retrieval") == 1


def test_a_resumed_rollout_keeps_the_missed_edits_from_the_manifest(redis_url, tmp_path) -> None:
    (tmp_path / "v00000001").mkdir()
    (tmp_path / "v00000001" / "manifest.json").write_text(
        '{"version": 1, "parent": 0, "base_model": "m", "edit_ids": ["p0", "p1"], "algo": "memit", "matrices": [],'
        ' "missed_edit_ids": ["p0"]}'
    )
    tier = TierStub()
    results, states, _, _, _ = _run(
        redis_url, tmp_path, StubRollout("skipped", "live"),
        [lambda p: p.publish(1, REQUESTS, missed=["p0"]), lambda p: p.resume()], tier,
    )
    assert results == ["pending", "live"] and tier.retired == ["p1"]
    assert states["p0"].reason_code == ReasonCode.efficacy and states["p1"].reason_code is None


def _manifest(tmp_path, version: int, parent: int, ids: list[str], missed: list[str] | None = None) -> None:
    (tmp_path / f"v{version:08d}").mkdir()
    (tmp_path / f"v{version:08d}" / "manifest.json").write_text(json.dumps({
        "version": version, "parent": parent, "base_model": "m", "edit_ids": ids, "algo": "memit", "matrices": [],
        "missed_edit_ids": missed or [],
    }))


def _commit_chain(redis_url, tmp_path, rollout, versions: int, during_rollout: int = 0):
    """Commit ``versions`` versions of one edit each, then one rollout attempt of the newest; ``during_rollout``
    more versions are committed while the canary is being checked."""
    requests = [EditRequest(edit_id=f"c{i}", subject="France", prompt=f"The capital {i} of {{}} is",
                            target_new="Lyon") for i in range(versions + during_rollout)]
    for v in range(1, versions + during_rollout + 1):
        _manifest(tmp_path, v, v - 1, [f"c{v - 1}"])

    async def go():
        streams = EditStreams.from_url(redis_url, f"test-{uuid.uuid4().hex[:10]}")
        publisher = Publisher(streams, StubPool(), LocalWeightStore(tmp_path), MemoryMetrics(), rollout)

        async def commit(v: int) -> None:
            await streams.finish([Finished(EditOutcome(edit_id=f"c{v - 1}", state=EditState.committed, version=v),
                                           None)], expect_head=v - 1, new_head=v)

        try:
            await streams.ensure_group()
            for r in requests:
                await streams.submit(r)
            for v in range(1, versions + 1):
                await commit(v)
            deploy = rollout.deploy

            async def slow_deploy(version, probes=()):
                for v in range(versions + 1, versions + during_rollout + 1):
                    await commit(v)  # the controller keeps committing while the canary is checked
                return await deploy(version, probes)

            rollout.deploy = slow_deploy
            result = await publisher.resume()
            states = await streams.statuses([r.edit_id for r in requests])
            statuses = [(await streams.version_info(v)).get("status") for v in range(1, versions + 1)]
            return result, states, await streams.head(), statuses, publisher.pool.synced
        finally:
            await streams.delete_namespace()
            await streams.close()

    return asyncio.run(go())


def test_only_the_newest_waiting_version_is_rolled_out_and_it_makes_every_earlier_edit_live(
    redis_url, tmp_path
) -> None:
    rollout = StubRollout("live")
    result, states, head, statuses, synced = _commit_chain(redis_url, tmp_path, rollout, versions=3)
    assert result == "live" and head == 3
    assert rollout.deployed == [(3, 3)]  # one rollout, probing the edits of versions 1..3
    assert [(s.state, s.version) for s in states.values()] == [(EditState.applied, v) for v in (1, 2, 3)]
    assert statuses[:2] == ["superseded", "superseded"] and synced == []


def test_a_rollback_also_discards_versions_committed_on_top_of_the_refused_one(redis_url, tmp_path) -> None:
    rollout = StubRollout("rolled_back", previous=0)
    result, states, head, statuses, synced = _commit_chain(redis_url, tmp_path, rollout, versions=2, during_rollout=2)
    assert result == "rolled_back"
    assert rollout.deployed == [(2, 2)]
    assert head == 0 and synced == [0]  # back to the served weights, and the workers follow them
    assert statuses[0] == "rolled_back"
    assert all(s.state == EditState.rolled_back for s in states.values())
    assert "built on version 2, which was rolled back" in states["c3"].reason
