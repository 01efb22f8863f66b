"""One controller per namespace: a lease in Redis (``{ns}:controller:lease``, SET NX with a TTL, renewed with the
heartbeat). Two controllers on one queue would each take batches and race to commit (an operator running ``editq up``
twice, or the old and the new Ray cluster of a KubeRay upgrade side by side); the second one waits in ``standby``
until the holder stops (it releases) or dies (its lease expires), then resumes from Redis like any restart.

The holder id is the controller's Ray actor id when it runs as an actor: Ray keeps that id across the restarts it
makes, so a restarted controller takes its own lease back at once instead of waiting out the TTL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

STANDBY_POLL_S = 2.0  # how often a standby controller tries the lease
LEASE_TTL_S = 30.0  # a dead holder blocks a standby at most this long; renewed every heartbeat (5 s)

# Renew / release only one's own lease (never another holder's): compare and act in one step.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def default_holder() -> str:
    """The Ray actor id inside an actor (stable across Ray's restarts of it), else a fresh id."""
    try:
        import ray

        if ray.is_initialized() and (actor := ray.get_runtime_context().get_actor_id()):
            return f"actor:{actor}"
    except Exception:
        pass
    return f"process:{uuid.uuid4().hex}"


def lease_key(namespace: str) -> str:
    return "{" + namespace + "}:controller:lease"


class ControllerLease:
    def __init__(self, redis: Any, namespace: str, holder: str | None = None, ttl_s: float = LEASE_TTL_S) -> None:
        self.redis = redis
        self.key = lease_key(namespace)
        self.holder = holder or default_holder()
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        """Take the lease if free (or already ours: then extend it)."""
        if await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            return True
        return await self.renew()

    async def renew(self) -> bool:
        """Extend our lease; False when another controller holds it (we lost it: stop taking batches)."""
        return bool(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))

    async def wait(self, stopped: Callable[[], bool], on_standby: Callable[[str | None], None]) -> bool:
        """Acquire, waiting while another controller holds the lease (``on_standby`` once, with its holder);
        False when ``stopped`` turns true first."""
        announced = False
        while not stopped():
            if await self.acquire():
                return True
            if not announced:
                on_standby(await self.current())
                announced = True
            await asyncio.sleep(STANDBY_POLL_S)
        return False

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.holder])

    async def current(self) -> str | None:
        raw = await self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw
