"""``editq restart-replicas``: restart every serving replica in turn without failing a query (an upgrade)."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.common import console, fail, with_streams
from controller.cli.keys import operator
from shared.audit import AuditAction, AuditEntry
from shared.settings import Settings
from shared.streams import EditStreams


def restart_replicas(
    drain_timeout: Annotated[float, typer.Option(min=1, help="Seconds a replica may take to finish its requests.")]
    = 60.0,
    ready_timeout: Annotated[float, typer.Option(min=10, help="Seconds a restarted replica may take to be back.")]
    = 900.0,
    allow_downtime: Annotated[bool, typer.Option(help="Also when no other replica is ready to take the traffic.")]
    = False,
) -> None:
    """Drain, restart and wait for each replica in turn (back at the live version) on the running cluster; each
    restart is audited. Queries keep being answered by the other replicas throughout."""
    import ray

    from controller.rollout.router import replica_clients
    from controller.rollout.upgrade import RestartReport, UpgradeRefused, rolling_restart

    ray.init(address="auto", namespace="editq", log_to_driver=False)
    principal = operator()

    async def go(streams: EditStreams) -> None:
        async def done(report: RestartReport) -> None:
            console.print(f"{report.replica}: back at version {report.version} after {report.out_of_traffic_s:.1f} "
                          f"s out of traffic (drained in {report.drain_s:.1f} s)")
            await streams.audit.append(AuditEntry(
                action=AuditAction.replica_restarted, principal=principal, version=report.version,
                detail=f"{report.replica}: incarnation {report.old_incarnation} -> {report.new_incarnation}"))

        await rolling_restart(replica_clients(Settings()), streams.live, drain_timeout, ready_timeout,
                              allow_downtime, on_done=done)

    try:
        with_streams(go)
    except UpgradeRefused as err:
        fail(str(err))
