"""Routing queries across serving replicas: only healthy, ready replicas (never one that is swapping or held as a
canary), least-loaded first, honouring ``min_version`` for read-your-writes.

The router keeps a short-lived table of replica states (``serving_status_ttl_s``). The table can be a moment
stale, so the replica itself is the final gate: a replica that started swapping refuses new requests with
``ReplicaUnavailableError`` before they reach its engine, and the router sends them elsewhere. Requests a swap had
to abort, and requests to a replica that died, are retried on another replica; nothing that produced output is
retried. A response below ``min_version`` (its replica was rolled back meanwhile) is retried too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.serving.config import ServingSettings
from workers.serving.schemas import (
    GenerateRequest,
    GenerateResult,
    ReplicaState,
    ReplicaStatus,
    ReplicaUnavailableError,
    RequestAbortedError,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
    SwapReport,
)

log = logging.getLogger("editq.router")


class ReplicaClient(Protocol):
    """What the router and the rollout need from a replica (a Ray actor in production, a fake in unit tests)."""

    name: str

    async def status(self) -> ReplicaStatus: ...
    async def generate(self, request: GenerateRequest) -> GenerateResult: ...
    def stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]: ...
    async def score(self, request: ScoreRequest) -> ScoreResult: ...
    async def apply_version(self, version: int, hold: bool = False, pause_timeout_s: float | None = None) -> SwapReport:
        ...
    async def release(self) -> ReplicaStatus: ...
    async def drain(self, timeout_s: float) -> ReplicaStatus: ...
    async def restart(self) -> None: ...


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors after which the request produced nothing: safe to send elsewhere."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return ReplicaUnavailableError, RequestAbortedError, RayActorError, ActorUnavailableError


class RayReplicaClient:
    """A replica actor behind the ``ReplicaClient`` interface, with call timeouts. Without a handle it looks the
    named actor up on first use (and again after the actor was removed for good), so a router may be built before
    the replicas exist."""

    def __init__(self, handle: Any | None, name: str, settings: ServingSettings) -> None:
        self._handle = handle
        self.name = name
        self.settings = settings

    @property
    def handle(self) -> Any:
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name)  # ValueError while it does not exist
        return self._handle

    async def _call(self, ref: Any, timeout_s: float) -> Any:
        return await asyncio.wait_for(ref, timeout_s)

    async def status(self) -> ReplicaStatus:
        from ray.exceptions import ActorDiedError

        try:
            return await self._call(self.handle.status.remote(), 5.0)
        except ActorDiedError:
            self._handle = None  # gone for good: look the name up again next time (it may be respawned)
            raise

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self._call(self.handle.generate.remote(request), self.settings.serving_request_timeout_s)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Chunks as the replica makes them. A caller that stops reading (an HTTP client gone mid-stream) cancels
        the actor task, whose asyncio cancellation makes vLLM abort the request and free its engine slot."""
        import ray

        generator = self.handle.generate_stream.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in generator:
                yield await ref
            finished = True
        finally:
            if not finished:
                ray.cancel(generator)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self._call(self.handle.score.remote(request), self.settings.serving_request_timeout_s)

    async def apply_version(self, version: int, hold: bool = False, pause_timeout_s: float | None = None) -> SwapReport:
        ref = self.handle.apply_version.remote(version, hold, pause_timeout_s)
        return await self._call(ref, self.settings.serving_swap_timeout_s)

    async def release(self) -> ReplicaStatus:
        return await self._call(self.handle.release.remote(), 10.0)

    async def drain(self, timeout_s: float) -> ReplicaStatus:
        return await self._call(self.handle.drain.remote(timeout_s), timeout_s + 10)

    async def restart(self) -> None:
        """Kill the actor; Ray restarts it (``max_restarts=-1``) and it rejoins at the live version."""
        import ray

        ray.kill(self.handle, no_restart=False)


@dataclass
class ReplicaView:
    """The router's last knowledge of one replica."""

    name: str
    state: str = "unknown"
    version: int | None = None
    healthy: bool = False
    error: str | None = None
    checked_at: float = 0.0
    routed: int = 0  # requests this router has in flight there

    @property
    def routable(self) -> bool:
        return self.healthy and self.state == ReplicaState.ready.value


class NoReplicaError(RuntimeError):
    """No healthy replica (at ``min_version``) appeared within the wait."""

    def __init__(self, message: str, min_version: int | None, views: list[ReplicaView]) -> None:
        super().__init__(message)
        self.min_version = min_version
        self.views = views


@dataclass
class Router:
    clients: Sequence[ReplicaClient]
    settings: ServingSettings = field(default_factory=ServingSettings)

    def __post_init__(self) -> None:
        self.views = {c.name: ReplicaView(c.name) for c in self.clients}
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        self._background: asyncio.Task | None = None
        self._rr = itertools.count()

    # ---- replica table --------------------------------------------------------------------------------------
    async def _check(self, client: ReplicaClient) -> None:
        view = self.views[client.name]
        try:
            status = await asyncio.wait_for(client.status(), 5.0)
            view.state, view.version, view.error = status.state.value, status.version, status.error
            view.healthy = status.state != ReplicaState.failed
        except Exception as err:
            view.healthy, view.state, view.error = False, "unreachable", f"{type(err).__name__}: {err}"[:300]
        view.checked_at = time.monotonic()

    async def refresh(self, force: bool = False) -> list[ReplicaView]:
        """The replica table. Re-read at once when ``force``d or when nothing valid is known (never read, or a
        failure marked it stale); once it is merely older than the TTL, re-read in the background, so a request
        never waits on status calls to busy replicas (that wait was most of the router's TTFT cost)."""
        if force or self._last_refresh == 0.0:
            await self._refresh_now(force)
        elif time.monotonic() - self._last_refresh >= self.settings.serving_status_ttl_s and (
            self._background is None or self._background.done()
        ):
            self._background = asyncio.create_task(self._refresh_now(False))
        return list(self.views.values())

    async def _refresh_now(self, force: bool) -> None:
        async with self._refresh_lock:  # one refresh at a time; a waiter finds the table fresh and returns
            if force or time.monotonic() - self._last_refresh >= self.settings.serving_status_ttl_s:
                await asyncio.gather(*(self._check(c) for c in self.clients))
                self._last_refresh = time.monotonic()

    def _mark_stale(self, name: str, error: BaseException) -> None:
        view = self.views[name]
        view.healthy, view.error = False, f"{type(error).__name__}: {error}"[:300]
        self._last_refresh = 0.0

    def _describe(self) -> str:
        return ", ".join(f"{v.name}={v.state}@{v.version}" for v in self.views.values()) or "no replicas"

    async def pick(self, min_version: int | None = None) -> ReplicaClient:
        """The least-loaded ready replica at ``min_version`` or newer; waits up to ``serving_min_version_wait_s``
        (a rollout may be bringing one), then raises ``NoReplicaError``."""
        deadline = time.monotonic() + self.settings.serving_min_version_wait_s
        while True:
            await self.refresh()
            candidates = [
                c for c in self.clients
                if self.views[c.name].routable
                and (min_version is None or (self.views[c.name].version or 0) >= min_version)
            ]
            if candidates:
                turn = next(self._rr) % len(candidates)  # round robin among the least loaded
                rotated = candidates[turn:] + candidates[:turn]
                return min(rotated, key=lambda c: self.views[c.name].routed)
            if time.monotonic() >= deadline:
                want = f" at version >= {min_version}" if min_version is not None else ""
                raise NoReplicaError(
                    f"no healthy replica{want} within {self.settings.serving_min_version_wait_s:.0f} s "
                    f"(replicas: {self._describe()})", min_version, list(self.views.values()),
                )
            await asyncio.sleep(0.05)
            self._last_refresh = 0.0

    # ---- requests -------------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        retryable = _retryable()
        last: BaseException | None = None
        for _ in range(self.settings.serving_request_retries + 1):
            client = await self.pick(request.min_version)
            view = self.views[client.name]
            view.routed += 1
            try:
                result = await client.generate(request)
            except retryable as err:
                last = err
                self._mark_stale(client.name, err)
                log.info("re-routing a request away from %s: %s", client.name, type(err).__name__)
                continue
            finally:
                view.routed -= 1
            if request.min_version is not None and result.version < request.min_version:
                last = NoReplicaError(f"{client.name} answered at version {result.version}", request.min_version, [])
                self._last_refresh = 0.0
                continue
            return result
        assert last is not None
        raise last

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Chunks of one completion; re-routed only while nothing has been produced yet."""
        retryable = _retryable()
        last: BaseException | None = None
        for _ in range(self.settings.serving_request_retries + 1):
            client = await self.pick(request.min_version)
            view = self.views[client.name]
            view.routed += 1
            chunks = client.stream(request)
            try:
                try:
                    first = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except retryable as err:
                    last = err
                    self._mark_stale(client.name, err)
                    continue
                if request.min_version is not None and first.version < request.min_version:
                    last = NoReplicaError(f"{client.name} is at version {first.version}", request.min_version, [])
                    self._last_refresh = 0.0
                    continue
                yield first
                async for chunk in chunks:
                    yield chunk
                return
            finally:
                view.routed -= 1
                await chunks.aclose()
        assert last is not None
        raise last

    async def score(self, request: ScoreRequest) -> ScoreResult:
        client = await self.pick()
        return await client.score(request)


# ---- the replica actors ---------------------------------------------------------------------------------------
def replica_name(settings: ServingSettings, index: int) -> str:
    return f"{settings.namespace}-replica-{index}"


def spawn_replicas(settings: ServingSettings, detached: bool = True) -> list[RayReplicaClient]:
    """Create (or find) the replica actors; each starts its engine and catches up to the live version by itself.

    ``max_restarts=-1``: a replica that dies is restarted by Ray and rejoins at the live version. ``detached``
    keeps the serving tier up across controller restarts (stop it with ``stop_replicas``). ``max_task_retries=0``:
    the router, not Ray, decides whether a request may run again.
    """
    import ray

    from workers.serving.replica import Replica
    from workers.serving.schemas import ReplicaConfig

    clients = []
    for index in range(settings.serving_replicas):
        name = replica_name(settings, index)
        options: dict[str, Any] = {
            "name": name, "get_if_exists": True, "num_cpus": settings.serving_replica_num_cpus,
            "num_gpus": settings.serving_replica_num_gpus, "max_restarts": -1, "max_task_retries": 0,
        }
        if detached:
            options["lifetime"] = "detached"
        config = ReplicaConfig(name=name, settings=settings.model_dump(mode="json"))
        clients.append(RayReplicaClient(ray.remote(Replica).options(**options).remote(config), name, settings))
    return clients


def replica_clients(settings: ServingSettings) -> list[RayReplicaClient]:
    """Clients of the replica actors by name (e.g. in the HTTP API process, connected to the same Ray cluster and
    namespace); each resolves its actor on first use, so replicas may start later."""
    return [RayReplicaClient(None, replica_name(settings, i), settings) for i in range(settings.serving_replicas)]


async def wait_ready(clients: Sequence[RayReplicaClient], timeout_s: float) -> list[ReplicaStatus]:
    """Wait until every replica has started and caught up (or failed to)."""
    return list(await asyncio.gather(*(
        asyncio.wait_for(c.handle.wait_ready.remote(timeout_s), timeout_s + 5) for c in clients
    )))


async def stop_replicas(clients: Sequence[RayReplicaClient]) -> None:
    """Shut the engines down cleanly, then remove the actors for good."""
    import ray

    for client in clients:
        try:
            await asyncio.wait_for(client.handle.shutdown.remote(), 60)
        except Exception as err:
            log.warning("replica %s did not shut down cleanly: %s", client.name, err)
        ray.kill(client.handle, no_restart=True)
