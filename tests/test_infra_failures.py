"""A transient infrastructure failure (here: the weight store's disk is full) never ends an accepted edit: the batch
goes back to the queue, its edits back to `queued`, and it is applied once the store works again (real Redis, real
Ray edit worker, the controller in this process so the store can fail on cue)."""

from __future__ import annotations

import asyncio
import errno
import time

from controller.pipeline.service import Controller
from shared.metrics import MemoryMetrics
from shared.outcomes import EditState
from shared.streams import EditStreams
from tests.pipeline_helpers import Probe, pipeline_settings, tiny_requests


def test_a_full_disk_leaves_the_batch_queued_then_applies_it(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url, batch_retries=1, retry_backoff_s=0.05,
                                 retrieval_enabled=False)
    probe = Probe(settings)
    requests = tiny_requests(3)
    metrics = MemoryMetrics()
    controller = Controller(settings.model_dump(mode="json"), metrics=metrics)
    real_put = controller.store.put
    failures: list[float] = []
    seen_states: set[str] = set()

    def full_disk(*args, **kwargs):
        if len(failures) < 4:  # the retries of two attempts of the batch
            failures.append(time.monotonic())
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(*args, **kwargs)

    controller.store.put = full_disk

    async def go() -> None:
        streams = EditStreams.from_url(settings.redis_url, settings.namespace)
        await streams.ensure_group()
        for r in requests:
            await streams.submit(r)
        run = asyncio.create_task(controller.run())
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                statuses = await streams.statuses([r.edit_id for r in requests])
                seen_states.update(s.state.value for s in statuses.values() if s)
                if all(s and s.state.terminal for s in statuses.values()):
                    break
                await asyncio.sleep(0.05)
        finally:
            await controller.stop()
            await run
            await streams.close()

    try:
        asyncio.run(go())
        states = {r.edit_id: probe.state(r.edit_id) for r in requests}
        assert len(failures) == 4
        assert set(states.values()) == {EditState.applied.value}  # applied, never failed
        assert EditState.failed.value not in seen_states
        assert probe.head() >= 1 and probe.redis.xlen(f"{probe.tag}:dlq") == 0
        assert metrics.get("editq_batch_failures", reason="infrastructure") == 2  # not the edits' fault
        assert metrics.get("editq_batch_failures", reason="worker_error") == 0
    finally:
        probe.cleanup()
