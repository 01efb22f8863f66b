"""editq as a Ray Serve application: what a KubeRay RayService runs (deploy/kuberay/rayservice.yaml).

Two deployments. ``ControllerHost`` (one replica) starts the serving replicas and the controller on this Ray
cluster and reports them to Serve's health checks. ``EditqAPI`` is the HTTP API (``controller.api.app.create_app``,
built inside each Serve replica) behind Serve's proxy, as many copies as wanted. A RayService upgrade with
``upgradeStrategy: NewCluster`` starts a whole new cluster beside the old one: its replicas load the live version from
the shared store and Redis and serve queries at once, its controller stands by on the namespace's lease
(``controller/pipeline/lease.py``) while the old one still runs, and KubeRay moves the Service to the new cluster once
Serve reports it healthy; when the old cluster goes, the new controller takes the lease over (at most its TTL later)
and resumes the queue. Edits submitted meanwhile wait in Redis: none is lost or applied twice.

    serve run controller.api.serve_app:app          # settings from EDITQ_* variables, as everywhere
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from controller.api.app import create_app
from controller.pipeline.operations import UNHEALTHY_STATES
from controller.pipeline.runtime import controller_name, start_controller
from shared.settings import Settings

log = logging.getLogger("editq.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=10,
                  health_check_timeout_s=30)
class ControllerHost:
    """Starts (or finds) the serving replicas and the controller; healthy while the controller runs or stands by."""

    def __init__(self) -> None:
        settings = Settings()
        if settings.serving_replicas > 0:
            from controller.rollout.router import spawn_replicas

            # Before the controller: a standby controller (another cluster still holds the lease) must not leave
            # this cluster without replicas, or it could not take the Service's traffic.
            spawn_replicas(settings)
        try:
            self.controller = ray.get_actor(controller_name(settings))  # a restarted host finds the running one
        except ValueError:
            self.controller, _ = start_controller(settings)
        self.namespace = settings.namespace

    async def check_health(self) -> None:
        status = await self.controller.status.remote()
        if status.state in UNHEALTHY_STATES:
            raise RuntimeError(f"controller of {self.namespace} is {status.state}: {status.last_error}")

    async def state(self) -> str:
        return (await self.controller.status.remote()).state


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(create_app)  # built in each Serve replica from its EDITQ_* environment
class EditqAPI:
    def __init__(self, host: Any) -> None:
        self.host = host  # bound so that Serve deploys the controller host with the API


def build(args: dict[str, str] | None = None) -> Application:
    """The application; ``args`` (a RayService's ``serveConfigV2`` ``args``, or ``serve run ... key=value``) are
    EDITQ_* settings for its processes, on top of the environment (secrets stay in the environment)."""
    args = dict(args or {})
    api_replicas = int(args.pop("api_replicas", 2))
    unknown = [k for k in args if not k.startswith("EDITQ_")]
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}: give EDITQ_* settings or api_replicas")
    options = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": args}}} if args else {}
    host = ControllerHost.options(**options).bind()
    return EditqAPI.options(num_replicas=api_replicas, **options).bind(host)


app = build()
