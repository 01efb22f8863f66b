"""Pipeline throughput and latency: sustained edits/s and XADD-to-applied latency (p50/p95).

For each (batch window, worker count) it starts a fresh controller on its own namespace, streams CounterFact edits
into Redis at a fixed arrival rate (0 = all at once, a backlog), and measures from the Redis stream ids themselves:
an edit's entry id holds its XADD time and its terminal outcome's entry id the time it was applied (both the
server's clock): the commit without serving replicas, the end of the canary rollout with them (``--replicas``).

    python benchmarks/pipeline.py --edits 40 --windows 0.5,2,5 --workers 1,2 --out benchmarks/results/pipeline_cpu.json
    python benchmarks/pipeline.py --edits 30 --rate 0.2 --replicas 1 --out ...   # offered load, served
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import ray

from controller.pipeline.runtime import ensure_redis, init_ray, start_controller, stop_controller
from shared.settings import Settings
from shared.streams import EditStreams
from workers.datasets import bundled_counterfact_path, load_edits


def _ms(stream_id: str) -> int:
    return int(stream_id.split("-")[0])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _reset(settings: Settings) -> None:
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    try:
        await streams.delete_namespace()
    finally:
        await streams.close()


async def _drive(settings: Settings, requests, rate: float, timeout_s: float) -> dict:
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    try:
        submitted: dict[str, str] = {}
        start = time.monotonic()
        for i, request in enumerate(requests):
            if rate > 0:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            submitted[request.edit_id] = (await streams.submit(request)).stream_id
        deadline = time.monotonic() + timeout_s
        outcomes: dict[str, tuple[str, str]] = {}
        while len(outcomes) < len(requests) and time.monotonic() < deadline:
            for sid, outcome in await streams.outcomes(count=10_000):
                outcomes[outcome.edit_id] = (sid, outcome.state.value)
            await asyncio.sleep(0.2)
        if len(outcomes) < len(requests):
            raise TimeoutError(f"{len(outcomes)}/{len(requests)} outcomes after {timeout_s} s")
        latencies = [(_ms(outcomes[e][0]) - _ms(sid)) / 1000 for e, sid in submitted.items()]
        first_xadd = min(_ms(s) for s in submitted.values())
        last_commit = max(_ms(o[0]) for o in outcomes.values())
        return {
            "edits": len(requests), "applied": sum(o[1] == "applied" for o in outcomes.values()),
            "versions": await streams.head(), "wall_seconds": (last_commit - first_xadd) / 1000,
            "edits_per_second": len(requests) / max(1e-9, (last_commit - first_xadd) / 1000),
            "latency_p50_seconds": _percentile(latencies, 0.5), "latency_p95_seconds": _percentile(latencies, 0.95),
        }
    finally:
        await streams.delete_namespace()
        await streams.close()


async def _wait_for_replicas(settings: Settings, timeout_s: float = 900) -> None:
    """Until every replica serves (engines started): the benchmark measures edits, not engine start-up."""
    from controller.rollout.router import replica_clients, wait_ready

    deadline = time.monotonic() + timeout_s
    while True:  # the controller spawns the replicas shortly after it starts: wait for the named actors
        try:
            statuses = await wait_ready(replica_clients(settings), timeout_s)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
    if any(s.state.value != "ready" for s in statuses):
        raise RuntimeError(f"replicas did not become ready: {[s.error for s in statuses]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.0, help="Arrival rate in edits/s; 0 submits a backlog.")
    parser.add_argument("--windows", default="0.5,2,5", help="batch_max_wait_s values")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--settle", type=float, default=None, help="batch_settle_s (default: the setting's)")
    parser.add_argument("--replicas", type=int, default=0, help="vLLM serving replicas (0: applied at commit)")
    parser.add_argument("--hparams", type=Path, default=None, help="editor hyperparameters JSON (EDITQ_HPARAMS_PATH)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = Settings()
    redis = ensure_redis(base)
    init_ray(num_cpus=os.cpu_count() or 2)
    rows = []
    requests = load_edits(bundled_counterfact_path(), limit=args.edits).requests
    for workers in [int(w) for w in args.workers.split(",")]:
        for window in [float(w) for w in args.windows.split(",")]:
            settings = base.model_copy(update={
                "redis_url": redis.url, "namespace": f"bench-pipeline-{workers}w-{window}", "n_edit_workers": workers,
                "batch_max_wait_s": window, "batch_max_size": args.batch_size,
                "worker_num_cpus": max(0.5, (os.cpu_count() or 2) / workers),
                "serving_replicas": args.replicas, "serving_replica_num_cpus": 0,
                "retrieval_enabled": False, "hparams_path": args.hparams,
                **({"batch_settle_s": args.settle} if args.settle is not None else {}),
            })
            store = settings.resolved_store_dir()
            if store.exists():
                import shutil

                shutil.rmtree(store)
            asyncio.run(_reset(settings))  # before the controller starts: never delete its stream under it
            actor, run_ref = start_controller(settings)
            while ray.get(actor.status.remote()).state != "running":  # measure the pipeline, not its start-up
                time.sleep(0.5)
            if args.replicas:
                asyncio.run(_wait_for_replicas(settings))
            try:
                row = asyncio.run(_drive(settings, requests, args.rate, args.timeout))
            finally:
                stop_controller(actor, run_ref, settings=settings)
            row |= {"workers": workers, "batch_max_wait_s": window, "batch_max_size": args.batch_size,
                    "batch_settle_s": settings.batch_settle_s, "rate": args.rate, "replicas": args.replicas}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "model": str(base.resolved_model_path()), "algo": base.algo, "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "results": rows,
        "note": "backlog mode when rate == 0: latency then includes queueing behind earlier batches",
        "median_edits_per_second_by_workers": {
            w: statistics.median(r["edits_per_second"] for r in rows if r["workers"] == w)
            for w in sorted({r["workers"] for r in rows})
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    redis.stop()


if __name__ == "__main__":
    main()
