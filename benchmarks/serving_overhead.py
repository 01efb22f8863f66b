"""Serving overhead against plain vLLM, side by side (issue 16): the same `vllm bench serve` load (vLLM's own client,
random dataset, offline) against vLLM's own OpenAI server on the base model, and against editq's API (router + one
replica, the same engine settings) with the retrieval tier on and off. One run, one machine, one after the other.

    .venv/bin/python benchmarks/serving_overhead.py --num-prompts 48 --out benchmarks/results/serving_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "completed", "failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench(base_url: str, model: str, tokenizer: Path, args, out: Path, api_key: str | None) -> dict:
    env = {**os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {})}
    cmd = [sys.executable, str(Path(__file__).with_name("vllm_bench.py")), "serve", "--backend", "openai",
           "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
           "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out.parent),
           "--result-filename", out.name]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}): {done.stderr[-3000:]}")
    raw = json.loads(out.read_text())
    return {k: raw.get(k) for k in METRICS}


def _wait_http(url: str, timeout_s: float = 900, headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers or {}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(url)


def plain_vllm(model_dir: Path, args, work: Path) -> dict:
    from shared.settings import Settings

    s = Settings()
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.serving_cpu_kvcache_gib)}
    log = open(work / "vllm-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(s.serving_max_model_len),
         "--gpu-memory-utilization", str(s.serving_gpu_memory_utilization), "--enforce-eager",
         "--served-model-name", model_dir.name], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models")
        return _bench(f"http://127.0.0.1:{port}", model_dir.name, model_dir, args,
                      work / f"plain-{uuid.uuid4().hex[:6]}.json", None)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _fill_tier(settings, n: int) -> int:
    """Put ``n`` bundled CounterFact edits in the Redis-backed tier the replica will read (what edits waiting for
    their weights, or refused by them, look like to a query)."""
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.retrieval.tier import RetrievalTier

    tier = RetrievalTier.for_model(settings)
    edits = load_edits(bundled_counterfact_path(), limit=n).requests
    for start in range(0, len(edits), 64):
        tier.add_many(edits[start:start + 64])
    return len(tier)


def editq(model_dir: Path, args, work: Path, tier: bool, entries: int = 0) -> dict:
    import ray
    import uvicorn

    from controller.api.app import create_app
    from controller.rollout.router import spawn_replicas, stop_replicas, wait_ready
    from controller.security.keys import KeyStore, Scope
    from shared.settings import Settings
    from shared.streams import EditStreams

    settings = Settings(namespace=f"bench-overhead-{uuid.uuid4().hex[:8]}", serving_replicas=1,
                        serving_replica_num_cpus=1, retrieval_enabled=tier, store_dir=work / f"store-{tier}",
                        serving_work_dir=work / f"swaps-{tier}", api_port=_free_port())
    stored = _fill_tier(settings, entries) if entries else 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="editq")
    clients = spawn_replicas(settings, detached=False)
    server = None
    try:
        asyncio.run(wait_ready(clients, 900))

        async def key() -> str:
            streams = EditStreams.from_url(settings.redis_url, settings.namespace)
            try:  # the load is the point here, not the rate limit
                secret, _ = await KeyStore(streams.redis, settings.namespace).create(
                    "bench", [Scope.query], "bench", rate_limit="100000/second")
                return secret
            finally:
                await streams.close()

        secret = asyncio.run(key())
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api_port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        base = f"http://127.0.0.1:{settings.api_port}"
        _wait_http(f"{base}/v1/models", 120, {"Authorization": f"Bearer {secret}"})
        result = _bench(base, settings.served_model_name(), model_dir, args,
                        work / f"editq-tier-{tier}-{entries}-{uuid.uuid4().hex[:6]}.json", secret)
        status = asyncio.run(clients[0].status())  # how many of the load's requests the tier touched
        return {**result, "tier_entries": stored, "tier_lookups": status.tier_lookups, "tier_hits": status.tier_hits}
    finally:
        if server is not None:
            server.should_exit = True
        asyncio.run(stop_replicas(clients))
        asyncio.run(_cleanup(settings))
        ray.shutdown()


async def _cleanup(settings) -> None:
    from shared.streams import EditStreams

    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    await streams.delete_namespace()
    await streams.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tier-entries", type=int, default=300, help="Edits in the tier for the last run.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run the whole sequence this many times; the table is the median per configuration.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from shared.settings import Settings

    model_dir = Settings().resolved_model_path()
    work = Path(tempfile.mkdtemp(prefix="editq-overhead-"))
    started = time.perf_counter()
    configs = {"plain_vllm": lambda: plain_vllm(model_dir, args, work),
               "editq_tier_off": lambda: editq(model_dir, args, work, tier=False),
               "editq_tier_on_empty": lambda: editq(model_dir, args, work, tier=True),
               f"editq_tier_on_{args.tier_entries}": lambda: editq(model_dir, args, work, tier=True,
                                                                   entries=args.tier_entries)}
    # Interleaved (every configuration once per round), so a slow spell of the machine hits all alike.
    rounds = [{name: run() for name, run in configs.items()} for _ in range(args.repeats)]
    runs = {name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in configs}
    plain = runs["plain_vllm"]
    ratios = {name: {"throughput_ratio": r["request_throughput"] / plain["request_throughput"],
                     "p50_ttft_delta_ms": r["median_ttft_ms"] - plain["median_ttft_ms"],
                     "p50_itl_delta_ms": r["median_itl_ms"] - plain["median_itl_ms"]}
              for name, r in runs.items() if name != "plain_vllm"}
    result = {
        "runs": runs, "vs_plain_vllm": ratios, "rounds": rounds, "load": vars(args) | {"out": str(args.out)},
        "targets": {"throughput_ratio": ">= 0.90", "p50_ttft_delta_ms": "<= 20 (tier off), <= 40 (tier on)"},
        "seconds_total": time.perf_counter() - started, "command": [sys.executable, *sys.argv],
        "notes": ["client: vLLM's own `vllm bench serve` (benchmarks/vllm_bench.py redirects only its version "
                  "lookup on vllm-cpu), random dataset, --ignore-eos, the same load for every run",
                  "plain_vllm: vLLM's OpenAI server on the base model (what `vllm serve` runs), float32, the "
                  "replica's engine settings; editq: the HTTP API (API key, router) over one replica",
                  "2 CPU cores: the client, the API and the engine share them",
                  "runs: the median over the rounds of each metric; rounds: every run as measured"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
