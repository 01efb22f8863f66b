"""History is never rewritten: version numbers are never reused, a rolled-back version keeps its number and files,
the store refuses to overwrite a version, and every outcome and commit leaves an audit entry (real Redis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from controller.pipeline.publish import Publisher
from shared.audit import AuditAction
from shared.delta import MatrixDelta, tensor_sha256
from shared.metrics import MemoryMetrics
from shared.outcomes import EditOutcome, EditState
from shared.schemas import EditRequest
from shared.streams import EditStreams, Finished
from shared.weight_store import LocalWeightStore, StoreError, build_manifest, lineage
from tests.test_publish import StubPool, StubRollout

NAME = "model.layers.0.mlp.down_proj.weight"


def _put(store: LocalWeightStore, version: int, parent: int, edit_ids: list[str]) -> None:
    base = torch.zeros(4, 4)
    delta = MatrixDelta.from_dense(NAME, torch.full((4, 4), float(version)))
    manifest = build_manifest(version, parent, "tiny", edit_ids, "memit", [delta], {NAME: tensor_sha256(base)})
    store.put(manifest, [delta], {})


class MarkingRollout(StubRollout):
    """Like the RolloutManager: marks the refused version rolled_back and moves `live` on success."""

    def __init__(self, streams: EditStreams, *statuses: str) -> None:
        super().__init__(*statuses, previous=0)
        self.streams = streams

    async def deploy(self, version, probes=()):
        result = await super().deploy(version, probes)
        if result.status == "live":
            await self.streams.set_live(version)
            await self.streams.set_version_status(version, "live")
        else:
            await self.streams.set_version_status(version, "rolled_back")
        return result


def test_a_rolled_back_version_keeps_its_number_and_files(redis_url, tmp_path) -> None:
    requests = [EditRequest(edit_id=f"h{i}", subject="France", prompt=f"Fact {i} of {{}} is", target_new="Lyon")
                for i in range(2)]

    async def go():
        streams = EditStreams.from_url(redis_url, f"test-{uuid.uuid4().hex[:10]}")
        store = LocalWeightStore(tmp_path)
        rollout = MarkingRollout(streams, "rolled_back", "live")
        publisher = Publisher(streams, StubPool(), store, MemoryMetrics(), rollout)
        try:
            await streams.ensure_group()
            for r in requests:
                await streams.submit(r, principal="upstream")
            numbers = []
            for r in requests:  # commit one edit per version; the first is refused by the canary
                head = await streams.head()
                version = await streams.next_version(max(store.versions(), default=0))
                numbers.append(version)
                _put(store, version, head, [r.edit_id])
                committed = Finished(EditOutcome(edit_id=r.edit_id, state=EditState.committed, version=version), None)
                assert await streams.finish([committed], expect_head=head, new_head=version,
                                            version_fields={"status": "committed", "parent": head, "edits": 1}) == 1
                await publisher.publish(version, [r])
            states = await streams.statuses([r.edit_id for r in requests])
            infos = [await streams.version_info(v) for v in numbers]
            audit = await streams.audit.read(count=100)
            return numbers, states, infos, audit, await streams.head(), await streams.live()
        finally:
            await streams.delete_namespace()
            await streams.close()

    numbers, states, infos, audit, head, live = asyncio.run(go())
    assert numbers == [1, 2]  # version 1 was rolled back (head back to 0): the next commit is 2, not 1 again
    assert head == live == 2
    store = LocalWeightStore(tmp_path)
    assert store.versions() == [1, 2]  # the rolled-back version's files stay
    assert [m.version for m in lineage(store, 2)] == [2]  # ...but it is off the lineage
    assert infos[0]["status"] == "rolled_back" and infos[1]["status"] == "live"
    assert states["h0"].state == EditState.rolled_back and states["h1"].state == EditState.applied
    trail = [(e.action, e.edit_id, e.version) for e in audit]
    assert (AuditAction.submit, "h0", None) in trail and (AuditAction.submit, "h1", None) in trail
    assert trail.index((AuditAction.version_committed, None, 1)) < trail.index((AuditAction.rolled_back, "h0", 1))
    assert (AuditAction.version_rolled_back, None, 1) in trail and (AuditAction.applied, "h1", 2) in trail
    assert all(e.principal == "upstream" for e in audit if e.action == AuditAction.submit)


def test_the_store_never_overwrites_a_version(tmp_path) -> None:
    store = LocalWeightStore(tmp_path)
    _put(store, 1, 0, ["a"])
    before = (tmp_path / "v00000001" / "delta.safetensors").read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        _put(store, 1, 0, ["b"])
    assert (tmp_path / "v00000001" / "delta.safetensors").read_bytes() == before
    assert store.manifest(1).edit_ids == ["a"]
    assert not list(tmp_path.glob(".v*"))  # nothing half-written left behind


def test_version_numbers_stay_above_the_store_after_redis_lost_its_state(redis_url, tmp_path) -> None:
    async def go():
        streams = EditStreams.from_url(redis_url, f"test-{uuid.uuid4().hex[:10]}")
        try:
            first = await streams.next_version(0)
            await streams.delete_namespace()  # Redis restarted without persistence
            after_loss = await streams.next_version(floor=7)  # the store still holds versions up to 7
            return first, after_loss
        finally:
            await streams.delete_namespace()
            await streams.close()

    assert asyncio.run(go()) == (1, 8)


def test_a_controller_refuses_to_start_on_a_redis_that_lost_its_state(redis_url, tmp_path) -> None:
    from controller.pipeline.operations import RecoveryRefused, RedisStateLostError, check_redis_state, recover_head

    store = LocalWeightStore(tmp_path)
    _put(store, 1, 0, ["a"])
    _put(store, 2, 1, ["b"])

    async def go():
        streams = EditStreams.from_url(redis_url, f"test-{uuid.uuid4().hex[:10]}")
        try:
            with pytest.raises(RedisStateLostError, match="versions up to 2"):
                await check_redis_state(streams, store)  # empty Redis, store with versions: never serve base
            await recover_head(streams, store, 2, "cli:ops")
            await check_redis_state(streams, store)  # accepted on purpose: runs again
            with pytest.raises(RecoveryRefused):  # a Redis with state has nothing to recover
                await recover_head(streams, store, 1, "cli:ops")
            audit = await streams.audit.read(count=10)
            return await streams.head(), await streams.live(), await streams.next_version(0), audit
        finally:
            await streams.delete_namespace()
            await streams.close()

    head, live, fresh, audit = asyncio.run(go())
    assert head == live == 2 and fresh == 3
    assert any(e.action == AuditAction.recovered and e.principal == "cli:ops" and e.version == 2 for e in audit)


def test_controller_starts_and_setting_changes_are_audited_without_secrets(redis_url) -> None:
    from controller.pipeline.operations import record_settings
    from shared.settings import Settings

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    secret_url = redis_url.replace("redis://", "redis://:hunter2-secret@") if "@" not in redis_url else redis_url

    async def go():
        streams = EditStreams.from_url(redis_url, namespace)
        try:
            first = await record_settings(streams, Settings(namespace=namespace, batch_max_size=25))
            second = await record_settings(streams, Settings(namespace=namespace, batch_max_size=50,
                                                             redis_url=secret_url))
            snapshot = await streams.redis.get("{" + namespace + "}:settings")
            return first, second, await streams.audit.read(count=10), snapshot
        finally:
            await streams.delete_namespace()
            await streams.close()

    first, second, audit, snapshot = asyncio.run(go())
    assert first == [] and second == ["batch_max_size"]  # the Redis URL is a secret: neither diffed nor stored
    actions = [e.action for e in audit]
    assert actions == [AuditAction.controller_started, AuditAction.controller_started, AuditAction.settings_changed]
    assert audit[-1].detail == "batch_max_size: 25 -> 50"
    assert "hunter2" not in snapshot and all("hunter2" not in (e.detail or "") for e in audit)
