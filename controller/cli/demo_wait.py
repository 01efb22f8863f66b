"""Waiting for the demo's system to come up on the signals it reports, never on a blind deadline.

Start-up on a fresh machine takes minutes and its parts start in parallel: each vLLM replica loads its engine, the
edit worker loads the model and its key statistics (computing them when ``make setup`` did not). The wait reads the
controller's status (worker state) and the router's replica table, shows on one status line what is still pending,
and stops at once when a part fails (the controller's loop ends, a replica reports ``failed``); the remaining bound
is the parts' own time limits (``worker_call_timeout_s``, ``serving_startup_timeout_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from rich.console import Console

from shared.settings import Settings


class StartupError(RuntimeError):
    """A part of the system failed or did not come up within its own time limit."""


def _stats_plans(settings: Settings) -> list:
    try:
        from workers.stats_prep import plan_statistics

        return plan_statistics(settings)
    except Exception:  # an unusual model: the worker will report the real error
        return []


def _missing_layers(plans: list) -> int:
    return sum(len(plan.missing) for plan in plans)


def describe_worker(settings: Settings) -> str:
    """What the edit worker's preparation will cost: cached statistics, or computed first and from what text."""
    plans = _stats_plans(settings)
    if not plans or not _missing_layers(plans):
        return "key statistics cached"
    return (f"key statistics not cached: the edit worker computes them first from {plans[0].cache.text_source()}, "
            "minutes on a CPU; `editq stats`, run by `make setup`, does this ahead")


def wait_ready(
    actor, run_ref, replicas: Callable[[], list[dict]] | None, settings: Settings, console: Console,
    poll_s: float = 1.0,
) -> float:
    """Block until the edit workers are synced and every replica is ready; returns the seconds waited."""
    started = time.monotonic()
    worker_limit = 2 * settings.worker_call_timeout_s + 60  # prepare worker 0, then sync (the pool's own bounds)
    replica_limit = settings.serving_startup_timeout_s + 60
    plans = _stats_plans(settings)
    workers_at: float | None = None
    ready_replicas: set[str] = set()
    with console.status("waiting for the controller...") as line:
        while True:
            elapsed = time.monotonic() - started
            done, _ = ray.wait([run_ref], timeout=0)
            if done:
                try:
                    final = ray.get(run_ref, timeout=10)
                except Exception as err:
                    raise StartupError(f"the controller failed while starting: {err}") from err
                raise StartupError(f"the controller stopped while starting ({final.state}: {final.last_error})")
            pending: list[str] = []
            if workers_at is None:
                try:
                    status = ray.get(actor.status.remote(), timeout=10)
                except ray.exceptions.GetTimeoutError:
                    status = None
                if status is not None and status.workers:
                    workers_at = elapsed
                    versions = ", ".join(f"v{w.version}" for w in status.workers)
                    console.print(f"[green]✓[/] edit worker(s) ready ({versions}) after {elapsed:.0f} s")
                else:
                    missing = _missing_layers(plans)
                    doing = (f"computing key statistics, {missing} layer(s) to go" if missing
                             else "loading the model, statistics and null spaces")
                    error = f"; last error: {status.last_error}" if status is not None and status.last_error else ""
                    pending.append(f"edit worker ({doing}{error})")
                    if elapsed > worker_limit:
                        raise StartupError(f"edit worker not ready after {elapsed:.0f} s ({doing}{error})")
            for replica in replicas() if replicas is not None else []:
                name, state = replica["name"], replica["state"]
                if state == "failed":
                    raise StartupError(f"replica {name} failed: {replica.get('error')}")
                if state == "ready":
                    if name not in ready_replicas:
                        ready_replicas.add(name)
                        console.print(f"[green]✓[/] replica {name} ready at v{replica['version']} "
                                      f"after {elapsed:.0f} s")
                    continue
                doing = "not created yet" if state == "unreachable" else f"{state}: vLLM engine and catch-up"
                pending.append(f"replica {name} ({doing})")
                if elapsed > replica_limit:
                    raise StartupError(f"replica {name} not ready after {elapsed:.0f} s ({doing})")
            if not pending:
                return elapsed
            line.update(f"waiting for {'; '.join(pending)} [{elapsed:.0f} s]")
            time.sleep(poll_s)
