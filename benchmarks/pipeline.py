"""Pipeline throughput and latency: sustained edits/s and XADD-to-version-committed latency (p50/p95).

For each (batch window, worker count) it starts a fresh controller on its own namespace, streams CounterFact edits
into Redis at a fixed arrival rate (0 = all at once, a backlog), and measures from the Redis stream ids themselves:
an edit's entry id holds its XADD time and its outcome entry id the commit time (both the server's clock).

    python benchmarks/pipeline.py --edits 40 --windows 0.5,2,5 --workers 1,2 --out benchmarks/results/pipeline_cpu.json
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

from controller.runtime import ensure_redis, init_ray, start_controller, stop_controller
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.0, help="Arrival rate in edits/s; 0 submits a backlog.")
    parser.add_argument("--windows", default="0.5,2,5", help="batch_max_wait_s values")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=20)
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
            })
            store = settings.resolved_store_dir()
            if store.exists():
                import shutil

                shutil.rmtree(store)
            asyncio.run(_reset(settings))  # before the controller starts: never delete its stream under it
            actor, run_ref = start_controller(settings)
            while ray.get(actor.status.remote()).state != "running":  # measure the pipeline, not its start-up
                time.sleep(0.5)
            try:
                row = asyncio.run(_drive(settings, requests, args.rate, args.timeout))
            finally:
                stop_controller(actor, run_ref)
            row |= {"workers": workers, "batch_max_wait_s": window, "batch_max_size": args.batch_size,
                    "rate": args.rate}
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
