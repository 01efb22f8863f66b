"""Starting what the pipeline needs on one machine: a Redis server, a local Ray cluster, the controller actor.

Redis: ``EDITQ_REDIS_URL`` when set, else a server already answering on the default URL, else a private
``redis-server`` started in a temporary directory (stopped again on exit), else a clear error saying how to get one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import ray
from redis import Redis
from redis.exceptions import RedisError

from controller.pipeline.service import Controller
from shared.settings import Settings, redacted_url

log = logging.getLogger("editq.runtime")


class RedisUnavailableError(RuntimeError):
    """No Redis server could be reached or started."""


@dataclass
class RedisHandle:
    url: str
    process: subprocess.Popen | None = None
    workdir: str | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        return bool(client.ping())
    except (RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_redis(settings: Settings) -> RedisHandle:
    """A reachable Redis URL, starting a private server only when none answers."""
    explicit = "EDITQ_REDIS_URL" in os.environ
    if redis_answers(settings.redis_url):
        return RedisHandle(settings.redis_url)
    if explicit:
        raise RedisUnavailableError(f"EDITQ_REDIS_URL={redacted_url(settings.redis_url)} does not answer PING")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            f"no Redis answers at {redacted_url(settings.redis_url)} and no redis-server is installed: install Redis 7 "
            "(e.g. `apt-get install redis-server` or `docker run -p 6379:6379 redis:7`) or set EDITQ_REDIS_URL"
        )
    workdir = tempfile.mkdtemp(prefix="editq-redis-")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    handle = RedisHandle(f"redis://127.0.0.1:{port}/0", process, workdir)
    atexit.register(handle.stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(handle.url):
            return handle
        if process.poll() is not None:
            break
        time.sleep(0.1)
    handle.stop()
    raise RedisUnavailableError(f"started {binary} on port {port} but it did not answer")


def init_ray(num_cpus: int | None = None, metrics_port: int | None = None) -> None:
    """A local Ray cluster (or the one ``RAY_ADDRESS`` points at), quiet and without the dashboard UI."""
    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "namespace": "editq"}
    if "RAY_ADDRESS" not in os.environ:
        kwargs["num_cpus"] = num_cpus or max(2, os.cpu_count() or 2)
        if metrics_port is not None:  # a fixed port Prometheus can scrape (editq up writes the target for it)
            kwargs["_metrics_export_port"] = metrics_port
    ray.init(**kwargs)
    # Ray 2.60's gRPC servers listen on every interface whatever the node address, so its token auth (on by default
    # for a new local cluster, token in ~/.ray/auth_token) is the guard: say so loudly when it is off.
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        log.warning("Ray token auth is off (RAY_AUTH_MODE=%s): anyone who reaches this machine's Ray ports can run "
                    "code in it", os.environ.get("RAY_AUTH_MODE", "unset"))


def controller_name(settings: Settings) -> str:
    return f"{settings.namespace}-controller"


def start_controller(settings: Settings):
    """Create the controller actor and start its loop; returns (actor handle, ObjectRef of ``run``).

    ``max_restarts=-1`` and ``max_task_retries=-1``: if the actor dies, Ray restarts it and re-submits ``run``, which
    resumes from Redis and the weight store.
    """
    actor = ray.remote(Controller).options(
        name=controller_name(settings), num_cpus=0, max_restarts=-1, max_task_retries=-1,
    ).remote(settings.model_dump(mode="json"))
    return actor, actor.run.remote()


def stop_controller(actor, run_ref, timeout_s: float = 60.0, stop_serving: bool = True, raise_errors: bool = True,
                    settings: Settings | None = None):
    """Ask the loop to stop, wait for its final status, then remove the actor and its edit workers; with
    ``stop_serving`` also the serving replicas (they are detached so they survive controller restarts).

    Every wait is bounded, and the replicas and the actor are removed even when the loop does not stop in time (a
    controller still preparing its workers cannot leave the loop) or has died; replicas the controller cannot stop
    are removed by name when ``settings`` is given. The first error is raised after that cleanup (with
    ``raise_errors``; else logged, and the status is None).
    """
    status, error = None, None
    try:
        ray.get(actor.stop.remote(), timeout=timeout_s)
        status = ray.get(run_ref, timeout=timeout_s)
    except Exception as err:  # GetTimeoutError, RayActorError, or the loop's own failure
        error = err
        log.warning("controller did not stop cleanly: %s: %s", type(err).__name__, err)
    if stop_serving:
        try:
            ray.get(actor.stop_serving.remote(), timeout=timeout_s + 60)
        except Exception as err:
            error = error or err
            log.warning("stopping the serving replicas through the controller failed: %s: %s",
                        type(err).__name__, err)
            if settings is not None:
                log.warning("removed %d replica actor(s) by name", kill_replicas(settings))
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
    if error is not None and raise_errors:
        raise error
    return status


def kill_replicas(settings: Settings) -> int:
    """Remove the (detached) replica actors by name, without waiting for their engines: the last resort of a
    teardown whose controller could not stop them. Returns how many were found."""
    from controller.rollout.router import replica_name

    found = 0
    for index in range(settings.serving_replicas):
        try:
            ray.kill(ray.get_actor(replica_name(settings, index)), no_restart=True)
            found += 1
        except ValueError:  # not there (never created, or already gone)
            continue
    return found
