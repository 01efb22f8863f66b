"""The Redis stream contract on a real Redis 7 server: idempotent intake, atomic commit, dead letters."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared.outcomes import EditOutcome, EditState, ReasonCode
from shared.schemas import EditRequest
from shared.streams import EditStreams, Finished


@pytest.fixture
def run(redis_url):
    """Run ``fn(streams)`` in a fresh event loop with a client bound to it, on a namespace of its own."""
    namespace = f"test-{uuid.uuid4().hex[:10]}"

    def runner(fn):
        async def go():
            streams = EditStreams.from_url(redis_url, namespace)
            try:
                await streams.ensure_group()
                return await fn(streams)
            finally:
                await streams.close()

        return asyncio.run(go())

    yield runner
    runner(lambda s: s.delete_namespace())


def _req(edit_id: str | None = None, target: str = "Lyon") -> EditRequest:
    return EditRequest(edit_id=edit_id, subject="France", prompt="The capital of {} is", target_new=target)


def test_submit_is_idempotent_on_edit_id(run) -> None:
    async def go(streams: EditStreams):
        first = await streams.submit(_req("a"))
        again = await streams.submit(_req("a", target="Nice"))  # same id, other content: still the first edit
        other = await streams.submit(_req())  # content-derived id
        same_content = await streams.submit(_req())
        return first, again, other, same_content, await streams.redis.xlen(streams.edits_key)

    first, again, other, same_content, length = run(go)
    assert not first.duplicate and first.state == EditState.queued
    assert again.duplicate and again.stream_id == first.stream_id
    assert other.edit_id.startswith("sha256:") and not other.duplicate
    assert same_content.duplicate and same_content.edit_id == other.edit_id
    assert length == 2


def test_finish_commits_once_and_acks_atomically(run) -> None:
    async def go(streams: EditStreams):
        await streams.submit(_req("a"))
        entry = (await streams.read("c", 10, None))[0]
        applied = EditOutcome(edit_id="a", state=EditState.applied, version=1)
        n1 = await streams.finish([Finished(applied, entry.stream_id)], expect_head=0, new_head=1,
                                  version_fields={"status": "committed"})
        stale = await streams.finish([Finished(applied, entry.stream_id)], expect_head=0, new_head=1)
        n2 = await streams.finish([Finished(applied, entry.stream_id)])  # already terminal: only acknowledged
        failed = EditOutcome(edit_id="a", state=EditState.failed, reason="late")
        n3 = await streams.finish([Finished(failed, None)])
        return (n1, stale, n2, n3, await streams.head(), await streams.status("a"), await streams.outcomes(),
                await streams.queue_depth())

    n1, stale, n2, n3, head, status, outcomes, depth = run(go)
    assert (n1, stale, n2, n3) == (1, -1, 0, 0)
    assert head == 1 and status.state == EditState.applied and status.version == 1
    assert [o.state for _, o in outcomes] == [EditState.applied]  # exactly one terminal outcome
    assert depth["pending"] == 0


def test_committed_state_is_not_published_until_terminal(run) -> None:
    async def go(streams: EditStreams):
        await streams.submit(_req("a"))
        committed = EditOutcome(edit_id="a", state=EditState.committed, version=1)
        await streams.finish([Finished(committed, None)])
        between = await streams.outcomes()
        await streams.finish([Finished(EditOutcome(edit_id="a", state=EditState.rolled_back, version=1), None)])
        return between, await streams.outcomes(), await streams.status("a")

    between, after, status = run(go)
    assert between == []
    assert [o.state for _, o in after] == [EditState.rolled_back]
    assert status.state == EditState.rolled_back


def test_dead_letter_keeps_the_reason_and_never_fails_another_edit(run) -> None:
    async def go(streams: EditStreams):
        await streams.submit(_req("real"))
        await streams.redis.xadd(streams.edits_key, {"edit_id": "real", "request": "{broken"})
        await streams.redis.xadd(streams.edits_key, {"edit_id": "orphan", "request": "{broken"})
        entries = await streams.read("c", 10, None)
        for entry in entries:
            if entry.request is None:
                await streams.dead_letter(entry, ReasonCode.invalid_payload, entry.error, 1)
        return entries, await streams.dead_letters(), await streams.status("real"), await streams.status("orphan")

    entries, dlq, real, orphan = run(go)
    assert [e.request is None for e in entries] == [False, True, True]
    assert len(dlq) == 2 and all(f["reason_code"] == "invalid_payload" for _, f in dlq)
    assert "invalid EditRequest" in dlq[0][1]["reason"]
    assert real.state == EditState.queued  # a corrupt copy of a real edit's id does not fail the real edit
    assert orphan.state == EditState.failed and orphan.reason_code == ReasonCode.invalid_payload


def test_trimming_drops_only_what_every_group_acknowledged(run) -> None:
    async def go(streams: EditStreams):
        ids = [(await streams.submit(_req(f"t{i}", f"City {i}"))).stream_id for i in range(5)]
        await streams.ensure_group("retrieval")
        assert await streams.trim_processed(0) == 0  # the retrieval group has read nothing yet
        for group in ("controller", "retrieval"):
            got = await streams.read("c", 3, None, group=group)
            assert [e.stream_id for e in got] == ids[:3]
            await streams.ack(ids[:2], group=group)  # t2 stays pending in both groups; t3, t4 undelivered
        assert await streams.trim_processed(3600) == 0  # all younger than the retention
        trimmed = await streams.trim_processed(0)
        left = [sid for sid, _ in await streams.redis.xrange(streams.edits_key)]
        await streams.ack(ids[2:3], group="controller")
        partly = await streams.trim_processed(0)  # still pending in the retrieval group
        await streams.ack(ids[2:3], group="retrieval")
        last = await streams.trim_processed(0)
        final = [sid for sid, _ in await streams.redis.xrange(streams.edits_key)]
        status = await streams.status("t0")
        return trimmed, left, partly, last, final, ids, status

    trimmed, left, partly, last, final, ids, status = run(go)
    assert trimmed == 2 and left == ids[2:]
    assert partly == 0 and last == 1 and final == ids[3:]  # undelivered entries are never trimmed
    assert status is not None and status.state == EditState.queued  # the edit's record keeps it
