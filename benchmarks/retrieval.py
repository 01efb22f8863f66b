"""Retrieval tier: edit-to-visible latency through the tier vs through the weights, and query-side overhead.

1. Visibility, side by side in one run: the controller (edit worker + the tier's indexer actor) runs on a local Ray
   cluster; edits are submitted one every few seconds; for each, the time from its XADD to the first lookup that
   returns it from a separate tier reader (what a serving replica does) and to its weight version being committed
   (its outcome's stream id). No serving replicas: committed == live here, so the weights number is a lower bound.
2. Query overhead at 1e3 / 1e4 / 1e5 stored edits: time of one lookup (query encoding + exact search + sentinel)
   and of building the prompt embeddings, per query, on this machine's CPU. Entries use real keys and prompts of
   the shipped checkpoint for the first records and random unit keys beyond (search cost does not depend on content).

    python benchmarks/retrieval.py --out benchmarks/results/retrieval_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

import ray
import torch

from controller.pipeline.runtime import ensure_redis, init_ray, start_controller, stop_controller
from shared.settings import Settings
from shared.streams import EditStreams
from workers.datasets import bundled_counterfact_path, load_edits
from workers.retrieval.index import KnowledgeIndex
from workers.retrieval.tier import RetrievalTier
from workers.serving.retrieval import load_input_embeddings


def _ms(stream_id: str) -> int:
    return int(stream_id.split("-")[0])


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


async def _visibility(settings: Settings, reader: RetrievalTier, edits, spacing_s: float) -> dict:
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    tier_s, weights_s = [], []
    try:
        await streams.ensure_group()
        submitted = {}
        for edit in edits:
            sid = (await streams.submit(edit)).stream_id
            submitted[edit.edit_id] = sid
            t0 = time.time()
            while True:
                hit = reader.lookup(edit.text)
                if hit is not None and hit.edit_id == edit.edit_id:
                    tier_s.append(time.time() - _ms(sid) / 1000)
                    break
                if time.time() - t0 > 60:
                    raise TimeoutError(f"{edit.edit_id} not visible in the tier after 60 s")
                await asyncio.sleep(0.005)
            await asyncio.sleep(spacing_s)
        deadline = time.monotonic() + 3600
        done: dict[str, str] = {}
        while len(done) < len(edits) and time.monotonic() < deadline:
            for sid, outcome in await streams.outcomes(count=10_000):
                done[outcome.edit_id] = sid
            await asyncio.sleep(0.5)
        weights_s = [(_ms(done[e]) - _ms(s)) / 1000 for e, s in submitted.items()]
    finally:
        await streams.close()
    return {"tier_visible_seconds": _stats(tier_s), "weights_committed_seconds": _stats(weights_s),
            "ratio_weights_over_tier_p50": statistics.median(weights_s) / statistics.median(tier_s)}


async def _drop_namespace(settings: Settings) -> None:
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    await streams.delete_namespace()
    await streams.close()


def _query_overhead(tier: RetrievalTier, embedding, tokenizer, edits, sizes: list[int], queries: int) -> list[dict]:
    keys, prompts = tier.encode_edits(edits)
    sentinel = tier.recipe.search_keys(tier.recipe.sentinel_key(tier.encoder))
    texts = [e.text for e in edits][:queries]
    rows = []
    for size in sizes:
        index = KnowledgeIndex(sentinel.detach(), tier.recipe.scale, tier.recipe.sentinel_offset)
        for i, edit in enumerate(edits):
            index.add(str(edit.edit_id), keys[i], prompts[i])
        gen = torch.Generator().manual_seed(0)
        filler = torch.nn.functional.normalize(torch.randn(size - len(edits), keys.shape[1], generator=gen), dim=1)
        for i, key in enumerate(filler):
            index.add(f"filler-{i}", key, prompts[0])
        tier.store = index
        lookup_s, embeds_s, hits = [], [], 0
        for text in texts:
            t0 = time.perf_counter()
            hit = tier.lookup(text)
            t1 = time.perf_counter()
            tier.prompt_embeds(embedding, tokenizer(text)["input_ids"], hit)
            lookup_s.append(t1 - t0)
            embeds_s.append(time.perf_counter() - t1)
            hits += hit is not None
        rows.append({"stored_edits": size, "lookup_seconds": _stats(lookup_s),
                     "prompt_embeds_seconds": _stats(embeds_s), "hit_rate": hits / len(texts)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    base = Settings()
    redis = ensure_redis(base)
    settings = base.model_copy(update={
        "redis_url": redis.url, "namespace": f"bench-retrieval-{uuid.uuid4().hex[:6]}", "batch_max_size": 4,
        "batch_max_wait_s": 0.5, "serving_replicas": 0, "worker_num_cpus": 1.0,
    })
    settings = settings.model_copy(update={"store_dir": settings.home / "versions" / settings.namespace})
    tokenizer = AutoTokenizer.from_pretrained(settings.resolved_model_path())
    edits = load_edits(bundled_counterfact_path(), limit=max(args.queries, args.edits)).requests
    init_ray(num_cpus=os.cpu_count() or 2)
    actor, run_ref = start_controller(settings)
    while ray.get(actor.status.remote()).state != "running":
        time.sleep(0.5)
    reader = RetrievalTier.for_model(settings)
    try:
        visibility = asyncio.run(_visibility(settings, reader, edits[: args.edits], args.spacing))
    finally:
        stop_controller(actor, run_ref)
        reader.store.drop()
        asyncio.run(_drop_namespace(settings))
    print(json.dumps(visibility), flush=True)
    embedding = load_input_embeddings(settings.resolved_model_path())
    tier = RetrievalTier.load(settings=settings)
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    overhead = _query_overhead(tier, embedding, tokenizer, edits[: args.queries], sizes, args.queries)
    out = {
        "model": str(settings.resolved_model_path()), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "visibility": visibility, "query_overhead_one_thread": overhead,
        "note": "weights = XADD to version committed with no serving replicas (a lower bound for live)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    redis.stop()


if __name__ == "__main__":
    main()
