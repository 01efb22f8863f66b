"""Zero-downtime restarts of the serving replicas (an upgrade of editq's replica code, new engine settings, a
leak): one replica at a time is drained (it takes no new requests and finishes the admitted ones), restarted by Ray,
and waited for until its new incarnation is ready at the live version, before the next one goes. The router sends
queries to the others meanwhile, so none fails; the controller is not involved (replicas are detached and survive
a controller restart; the edit pipeline is exactly-once across one, see docs/operations.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel

from controller.rollout.router import ReplicaClient
from workers.serving.schemas import ReplicaState, ReplicaStatus

log = logging.getLogger("editq.upgrade")


class RestartReport(BaseModel):
    """One replica's planned restart: how long it was out of traffic and where it came back."""

    replica: str
    old_incarnation: str
    new_incarnation: str
    version: int | None
    left_in_flight: int
    drain_s: float
    out_of_traffic_s: float


class UpgradeRefused(RuntimeError):
    """Restarting a replica now would leave no other ready replica to serve (or one did not come back)."""


async def _ready_others(clients: Sequence[ReplicaClient], leaving: ReplicaClient) -> int:
    async def ready(client: ReplicaClient) -> bool:
        try:
            return (await client.status()).state == ReplicaState.ready
        except Exception:
            return False

    return sum(await asyncio.gather(*(ready(c) for c in clients if c is not leaving)))


async def _back(client: ReplicaClient, old: str, live: Callable[[], Awaitable[int]], timeout_s: float) -> ReplicaStatus:
    """The replica's new incarnation once ready at the live version (it catches up by itself on start)."""
    deadline = time.monotonic() + timeout_s
    status: ReplicaStatus | None = None
    while time.monotonic() < deadline:
        try:
            status = await client.status()
        except Exception:  # the actor is restarting
            status = None
        if status is not None and status.incarnation != old:
            if status.state == ReplicaState.failed:
                raise UpgradeRefused(f"{client.name} came back failed: {status.error}")
            if status.state == ReplicaState.ready and status.version == await live():
                return status
        await asyncio.sleep(1.0)
    raise UpgradeRefused(f"{client.name} was not back at the live version within {timeout_s:.0f} s "
                         f"(last status: {status.state.value if status else 'unreachable'})")


async def rolling_restart(clients: Sequence[ReplicaClient], live: Callable[[], Awaitable[int]],
                          drain_timeout_s: float = 60.0, ready_timeout_s: float = 900.0,
                          allow_downtime: bool = False,
                          on_done: Callable[[RestartReport], Awaitable[None]] | None = None) -> list[RestartReport]:
    """Restart every replica in turn (drain, restart, wait ready at live). Refuses, before touching a replica, when
    no other replica is ready to take its traffic, unless ``allow_downtime``."""
    reports = []
    for client in clients:
        if not allow_downtime and await _ready_others(clients, client) == 0:
            raise UpgradeRefused(f"restarting {client.name} now would leave no ready replica to serve queries "
                                 "(run more replicas, or allow downtime)")
        old = (await client.status()).incarnation
        t0 = time.monotonic()
        drained = await client.drain(drain_timeout_s)
        drain_s = time.monotonic() - t0
        if drained.in_flight:
            log.warning("%s: %d request(s) still running after %.0f s of draining; restarting anyway (the router "
                        "retries those that produced nothing)", client.name, drained.in_flight, drain_timeout_s)
        await client.restart()
        status = await _back(client, old, live, ready_timeout_s)
        report = RestartReport(replica=client.name, old_incarnation=old, new_incarnation=status.incarnation,
                               version=status.version, left_in_flight=drained.in_flight, drain_s=drain_s,
                               out_of_traffic_s=time.monotonic() - t0)
        log.info("%s restarted: back at version %s after %.1f s out of traffic", client.name, status.version,
                 report.out_of_traffic_s)
        reports.append(report)
        if on_done is not None:
            await on_done(report)
    return reports
