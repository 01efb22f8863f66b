"""Hot-swap cost on real vLLM replicas: generation pause per swap, rollout time, query latency idle vs during
rollouts, and the bytes a version moves (stored low-rank delta vs the dense matrices the engines load).

    python benchmarks/swap.py --out benchmarks/results/swap_cpu.json

Starts a local Ray cluster and two replica actors (SmolLM2 by default), commits one version with the real editor
(a few CounterFact edits) into a temporary store, then alternates ``deploy(1)`` / ``deploy(0)`` (a rollback is
the same kind of swap), first with no queries, then while clients query through the router. A swap's pause is
the time its replica takes no new requests: the drain of in-flight requests (``mode="wait"``) plus reload, verify
and prefix-cache reset. Requests are counted "during rollout" when they overlap a rollout's time window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import ray

from controller.rollout.rolling import RolloutManager, probes_from_requests
from controller.rollout.router import Router, spawn_replicas, stop_replicas, wait_ready
from shared.streams import EditStreams
from shared.weight_store import LocalWeightStore
from workers.datasets import bundled_counterfact_path, load_edits
from workers.serving.config import ServingSettings
from workers.serving.devtools import commit_edits
from workers.serving.schemas import GenerateRequest
from workers.serving.weights import version_bytes

PROMPTS = ["The capital of France is", "The official language of Japan is", "BBC One, by",
           "Howard Glacier is located in", "Galata is in", "Write one sentence about the sea."]


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(values), "p50_s": pick(0.50), "p99_s": pick(0.99), "max_s": ordered[-1],
            "mean_s": statistics.fmean(values)}


def commit_version(settings: ServingSettings, n_edits: int) -> tuple[list, dict]:
    """Version 1 from ``n_edits`` bundled CounterFact edits (AlphaEdit; context templates off for CPU speed)."""
    from workers.editing.editor import Editor
    from workers.editing.hparams import default_hparams
    from workers.editing.stats import SecondMomentCache, StatsCorpus
    from workers.model_io import load_model, model_fingerprint

    path = settings.resolved_model_path()
    model, tokenizer = load_model(path, device="cpu")
    fingerprint = model_fingerprint(path)
    records = load_edits(bundled_counterfact_path(), limit=2 * n_edits).requests[0 : 2 * n_edits : 2]
    hp = default_hparams(model.config, "alphaedit").with_overrides(n_context_templates=0)
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    t0 = time.perf_counter()
    store = LocalWeightStore(settings.resolved_store_dir())
    manifest = commit_edits(store, Editor(model, tokenizer, hp, stats, fingerprint), records, 1, 0, fingerprint)
    shapes = {tuple(e.shape) for e in manifest.matrices}
    return records, {"edit_seconds": time.perf_counter() - t0, "shapes": sorted(shapes)}


class Load:
    def __init__(self, router: Router, concurrency: int, max_tokens: int) -> None:
        self.router, self.concurrency, self.max_tokens = router, concurrency, max_tokens
        self.records: list[tuple[float, float, int]] = []
        self.errors: list[str] = []
        self.stop = False

    async def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop:
            t0 = time.monotonic()
            try:
                r = await self.router.generate(GenerateRequest(
                    prompt=rng.choice(PROMPTS), max_tokens=self.max_tokens, temperature=0.0))
                self.records.append((t0, time.monotonic(), r.version))
            except Exception as err:
                self.errors.append(f"{type(err).__name__}: {err}")

    async def run_for(self, seconds: float | None) -> None:
        """Query for ``seconds``, or until ``stop`` is set when None."""
        self.stop = False
        tasks = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]
        if seconds is not None:
            await asyncio.sleep(seconds)
            self.stop = True
        await asyncio.gather(*tasks)


async def bench(settings: ServingSettings, args: argparse.Namespace, requests: list) -> dict:
    clients = spawn_replicas(settings, detached=False)
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    try:
        t0 = time.perf_counter()
        await wait_ready(clients, 900)
        startup_s = time.perf_counter() - t0
        router = Router(clients, settings)
        manager = RolloutManager(clients, settings, streams=streams)
        probes = probes_from_requests(requests)
        quiet = []  # swaps with no queries in flight: the pause is the reload alone
        for version in (1, 0, 1, 0):
            result = await manager.deploy(version, probes if version == 1 else [])
            quiet += [o.swap.pause_s for o in result.replicas if o.swap is not None]
        load = Load(router, args.concurrency, args.max_tokens)
        await load.run_for(5.0)  # warm-up
        load.records.clear()
        await load.run_for(args.idle_seconds)
        idle = [t1 - t0 for t0, t1, _ in load.records]
        load.records.clear()
        windows, rollouts, swaps = [], [], []
        load_task = asyncio.create_task(load.run_for(None))
        await asyncio.sleep(1.0)
        for i in range(args.rounds):
            for version in (1, 0):
                start = time.monotonic()
                result = await manager.deploy(version, probes if version == 1 else [])
                windows.append((start, time.monotonic()))
                rollouts.append({"version": version, "status": result.status, "seconds": result.seconds,
                                 "reason": result.reason})
                swaps += [o.swap.model_dump(include={"replica", "from_version", "to_version", "ok", "drain",
                                                     "pause_s", "materialise_s", "reload_s", "total_s",
                                                     "bytes_loaded", "max_probe_error", "min_probe_separation"})
                          for o in result.replicas if o.swap is not None]
            print(f"round {i + 1}/{args.rounds}: rollouts {[round(r['seconds'], 2) for r in rollouts[-2:]]} s")
        await asyncio.sleep(1.0)
        load.stop = True
        await load_task
        during = [t1 - t0 for t0, t1, _ in load.records if any(t0 < b and t1 > a for a, b in windows)]
        pauses = [s["pause_s"] for s in swaps]
        return {
            "replica_startup_s": startup_s,
            "swap_pause_no_load_s": _quantiles(quiet),
            "swap_pause_s": _quantiles(pauses) | {"per_swap": pauses},
            "swap_drain_s": _quantiles([s["pause_s"] - s["reload_s"] for s in swaps]),
            "swap_materialise_s": _quantiles([s["materialise_s"] for s in swaps]),
            "swap_reload_and_verify_s": _quantiles([s["reload_s"] for s in swaps]),
            "rollout_2_replicas_s": _quantiles([r["seconds"] for r in rollouts]),
            "rollout_2_replicas_forward_s": _quantiles([r["seconds"] for r in rollouts if r["version"] == 1]),
            "rollouts": rollouts,
            "swaps": swaps,
            "latency_idle": _quantiles(idle),
            "latency_during_rollout": _quantiles(during),
            "requests_during_run": len(load.records),
            "failed_requests": len(load.errors),
            "errors": load.errors[:5],
        }
    finally:
        await stop_replicas(clients)
        await streams.delete_namespace()
        await streams.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edits", type=int, default=3, help="Edits in the benchmarked version.")
    parser.add_argument("--rounds", type=int, default=5, help="deploy(1) + deploy(0) pairs.")
    parser.add_argument("--concurrency", type=int, default=2, help="Concurrent query clients.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="editq-swap-bench-"))
    settings = ServingSettings(namespace=f"bench-swap-{uuid.uuid4().hex[:8]}", store_dir=work / "versions",
                               serving_replicas=2, serving_replica_num_cpus=1.0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="editq-bench")
    try:
        requests, edit_info = commit_version(settings, args.edits)
        results = asyncio.run(bench(settings, args, requests))
        moved = version_bytes(LocalWeightStore(settings.resolved_store_dir()), 1)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    (d_out, d_in), n = edit_info["shapes"][0], moved["matrices"]
    out = {
        "model": settings.resolved_model_path().name, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "vllm_dtype": settings.serving_dtype, "replicas": 2,
        "edits_in_version": args.edits, "query_concurrency": args.concurrency, "query_max_tokens": args.max_tokens,
        "bytes_per_version": {
            "measured_version_1": moved,
            "formula_per_batch_size": {
                str(b): {"lowrank_delta_bytes": n * b * (d_out + d_in) * 4, "dense_bytes": n * d_out * d_in * 4}
                for b in (1, 10, 50, 100, 200)
            },
            "note": "low-rank delta = the stored factors (rank <= batch size) that travel to each replica; dense = "
                    "the full float32 matrices each engine reloads. Factors are smaller while rank < "
                    "d_out*d_in/(d_out+d_in).",
        },
        **edit_info, **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("swap_pause_no_load_s", "swap_pause_s", "swap_drain_s",
                                          "swap_reload_and_verify_s", "rollout_2_replicas_s", "latency_idle",
                                          "latency_during_rollout", "failed_requests")}, indent=2)[:3000])


if __name__ == "__main__":
    main()
