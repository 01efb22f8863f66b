"""One controller per namespace (controller/pipeline/lease.py) on a real Redis and a local Ray cluster: a second
controller on the same queue (an operator starting `editq up` twice, or the old and the new cluster of a KubeRay
upgrade) stands by, takes nothing, and takes over when the first one stops."""

from __future__ import annotations

import asyncio
import time
import uuid

import ray

from controller.pipeline.lease import ControllerLease
from controller.pipeline.runtime import controller_name, start_controller, stop_controller
from controller.pipeline.service import Controller
from tests.pipeline_helpers import Probe, pipeline_settings, tiny_requests
from tests.test_pipeline import _submit


def test_the_lease_has_one_holder_and_expires_when_not_renewed(redis_url) -> None:
    from redis.asyncio import Redis

    async def go():
        redis = Redis.from_url(redis_url, decode_responses=True)
        ns = f"test-lease-{uuid.uuid4().hex[:8]}"
        try:
            a, b = ControllerLease(redis, ns, "a"), ControllerLease(redis, ns, "b")
            assert await a.acquire() and not await b.acquire() and await b.current() == "a"
            assert await a.renew() and await a.acquire()  # re-acquiring one's own lease extends it
            await b.release()  # not b's: nothing happens
            assert await b.current() == "a"
            await a.release()
            assert await b.acquire() and not await a.renew() and await a.current() == "b"
            short, other = ControllerLease(redis, ns + "-ttl", "s", ttl_s=0.3), ControllerLease(redis, ns + "-ttl", "o")
            assert await short.acquire() and not await other.acquire()
            await asyncio.sleep(0.5)  # the holder died: its lease runs out
            assert await other.acquire() and not await short.renew()
            stopped = []
            assert not await short.wait(lambda: bool(stopped), lambda holder: stopped.append(holder))
            assert stopped == ["o"]
        finally:
            await redis.delete(f"{{{ns}}}:controller:lease", f"{{{ns}-ttl}}:controller:lease")
            await redis.aclose()

    asyncio.run(go())


def test_a_second_controller_stands_by_and_takes_over(ray_session, redis_url, tiny_model_dir, tmp_path) -> None:
    settings = pipeline_settings(tmp_path, tiny_model_dir, redis_url)
    probe = Probe(settings)
    first, first_run = start_controller(settings)
    lease = f"{{{settings.namespace}}}:controller:lease"
    deadline = time.monotonic() + 120
    while probe.redis.get(lease) is None:  # the first one holds the namespace before the second one starts
        assert time.monotonic() < deadline, "the first controller never took its lease"
        time.sleep(0.1)
    # The same namespace from another Ray namespace: what a second cluster would start.
    second = ray.remote(Controller).options(name=controller_name(settings), namespace=f"other-{uuid.uuid4().hex[:6]}",
                                            num_cpus=0).remote(settings.model_dump(mode="json"))
    second_run = second.run.remote()
    try:
        requests = tiny_requests(8)
        _submit(settings, requests[:4])
        assert set(probe.wait_terminal([r.edit_id for r in requests[:4]]).values()) == {"applied"}
        waiting = ray.get(second.status.remote())
        assert waiting.state == "standby" and waiting.batches_committed == 0
        assert ray.get(first.status.remote()).batches_committed >= 1
        stop_controller(first, first_run, stop_serving=False)
        _submit(settings, requests[4:])
        assert set(probe.wait_terminal([r.edit_id for r in requests[4:]], timeout_s=300).values()) == {"applied"}
        took_over = ray.get(second.status.remote())
        assert took_over.state == "running" and took_over.batches_committed >= 1
        stop_controller(second, second_run, stop_serving=False)
        assert probe.redis.get(lease) is None  # released on stop
    finally:
        stop_controller(second, second_run, stop_serving=False, raise_errors=False)
        probe.cleanup()
