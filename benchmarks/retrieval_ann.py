"""Retrieval tier at scale: exact search vs the ANN path (faiss PQ fast-scan + exact re-ranking) at 1e5 and 1e6 keys.

For each size, one ``KnowledgeIndex`` holds real keys of the shipped RECIPE checkpoint (every CounterFact train and
val statement, 11,919) plus random unit keys up to the size, each entry with one tiny shared prompt tensor so 1e6
entries fit in memory. The exact side is a second index object over the same key matrix (no copy). Measured:

* build: seconds to add the entries, and to build the ANN synchronously (``build_ann``: quantiser training +
  adding every key); at 1e5 also the lazy path, the way a server meets it: 99,999 entries, one more, then single
  queries until the ANN is live (latency of each, background training time);
* search only (query key given): p50/p95 per single query, exact vs ANN;
* full lookup (``RetrievalTier.lookup``: query encoding + search + sentinel, as benchmarks/retrieval.py): p50/p95,
  and the query encoding alone on the same texts;
* recall@1 of the ANN against exact search, and agreement of the served decision (same edit or both rejected), on
  (a) stored random keys perturbed to the cosine real paraphrase queries have with their own key (resampled from
  the measured distribution), (b) fresh random unit queries (no meaningful neighbour: the hardest case, and the
  sentinel rejects them all), (c) real CounterFact val paraphrase queries (their own edit is stored) and (d) real
  neighbourhood prompts (other subjects; the sentinel should reject them).

One torch thread and one faiss (OpenMP) thread: another job shares this machine's cores.

    python benchmarks/retrieval_ann.py --out benchmarks/results/retrieval_ann_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import faiss
import torch

from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.retrieval.ann import AnnConfig
from workers.retrieval.index import KnowledgeIndex
from workers.retrieval.tier import RetrievalTier, checkpoint_id, default_checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "mean": statistics.fmean(ordered), "max": ordered[-1], "n": len(ordered)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, 65536):
        block = torch.randn(min(65536, n - start), dim, generator=gen)
        out[start: start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    return out


def _perturbed(keys: torch.Tensor, cosines: torch.Tensor, seed: int) -> torch.Tensor:
    """Unit queries at the given cosine from each key (the rest of each query a random orthogonal direction)."""
    noise = _unit_rows(keys.shape[0], keys.shape[1], seed)
    noise = torch.nn.functional.normalize(noise - (noise * keys).sum(1, keepdim=True) * keys, dim=1)
    c = cosines[:, None]
    return c * keys + (1 - c**2).clamp(min=0).sqrt() * noise


def _encode_queries(tier: RetrievalTier, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([tier._query_keys(texts[i: i + 256]) for i in range(0, len(texts), 256)])


def _fill(index: KnowledgeIndex, real_keys: torch.Tensor, filler: torch.Tensor, size: int, prompt: torch.Tensor
          ) -> float:
    t0 = time.perf_counter()
    for i, key in enumerate(real_keys):
        index.add(f"real-{i}", key, prompt)
    for i in range(size - len(real_keys)):
        index.add(f"filler-{i}", filler[i], prompt)
    return time.perf_counter() - t0


def _exact_view(index: KnowledgeIndex) -> KnowledgeIndex:
    """An index that searches the same entries exactly (shares the key matrix and maps; read-only use)."""
    exact = KnowledgeIndex(index.sentinel_key, index.scale, index.sentinel_offset,
                           ann=AnnConfig(min_entries=10**12))
    exact._keys, exact._ids, exact._row = index._keys, index._ids, index._row
    exact._prompts, exact._statements = index._prompts, index._statements
    return exact


def _search_latency(index: KnowledgeIndex, queries: torch.Tensor) -> dict[str, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q)
        times.append(time.perf_counter() - t0)
    return _stats(times)


def _lookup_latency(tier: RetrievalTier, index: KnowledgeIndex, texts: list[str]) -> dict:
    tier.store = index
    times, hits = [], 0
    for text in texts:
        t0 = time.perf_counter()
        hit = tier.lookup(text)
        times.append(time.perf_counter() - t0)
        hits += hit is not None
    return {"seconds": _stats(times), "hit_rate": hits / len(texts)}


def _encode_latency(tier: RetrievalTier, texts: list[str]) -> dict[str, float]:
    times = []
    with torch.no_grad():
        for text in texts:
            t0 = time.perf_counter()
            tier._query_keys([text])
            times.append(time.perf_counter() - t0)
    return _stats(times)


def _agreement(approx: KnowledgeIndex, exact: KnowledgeIndex, queries: torch.Tensor, own: list[str] | None) -> dict:
    got, want = [], []
    for start in range(0, queries.shape[0], 100):
        got += approx.search(queries[start: start + 100])
        want += exact.search(queries[start: start + 100])
    n = len(got)
    out = {
        "n": n,
        "recall_at_1": sum(g.edit_id == w.edit_id for g, w in zip(got, want, strict=True)) / n,
        "decision_agreement": sum((g.edit_id if g.accepted else None) == (w.edit_id if w.accepted else None)
                                  for g, w in zip(got, want, strict=True)) / n,
        "exact_accept_rate": sum(w.accepted for w in want) / n,
        "max_score_error": max(abs(g.score - w.score) for g, w in zip(got, want, strict=True)
                               if g.edit_id == w.edit_id),
    }
    if own is not None:  # queries whose exact top-1 is their own key have a meaningful nearest neighbour
        mine = [(g, w) for g, w, o in zip(got, want, own, strict=True) if w.edit_id == o]
        out["exact_top1_is_own_key"] = len(mine) / n
        hits = sum(g.edit_id == w.edit_id for g, w in mine)
        out["recall_at_1_where_exact_top1_is_own_key"] = hits / max(1, len(mine))
    return out


def _lazy_crossing(real_keys: torch.Tensor, filler: torch.Tensor, prompt: torch.Tensor, sentinel: torch.Tensor,
                   scale: float, offset: float, queries: torch.Tensor, threshold: int) -> dict:
    index = KnowledgeIndex(sentinel, scale, offset, ann=AnnConfig(min_entries=threshold))
    _fill(index, real_keys, filler, threshold - 1, prompt)
    before = _search_latency(index, queries[:50])
    index.add("crossing", filler[threshold], prompt)
    times, t0 = [], time.perf_counter()
    i = 0
    while not index.ann_stats["active"]:
        q = queries[i % len(queries)]
        i += 1
        t = time.perf_counter()
        index.search(q)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t0 > 300:
            break
    live_after = time.perf_counter() - t0
    stats = index.ann_stats
    after = _search_latency(index, queries[:200])
    return {"threshold": threshold, "exact_search_before_crossing_seconds": before,
            "searches_until_ann_live": len(times), "seconds_until_ann_live": live_after,
            "first_search_after_crossing_seconds": times[0] if times else None,
            "search_seconds_while_building": _stats(times) if times else None,
            "background_training_seconds": stats["seconds_training"], "ann_search_seconds_after": after,
            "build_step_ms": index.ann_config.build_step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--train", type=Path, default=DATA / "counterfact-train.json")
    parser.add_argument("--val", type=Path, default=DATA / "counterfact-val.json")
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--random-queries", type=int, default=1000)
    parser.add_argument("--neighbour-queries", type=int, default=1000)
    parser.add_argument("--threshold", type=int, default=AnnConfig().min_entries, help="ANN from this many entries")
    parser.add_argument("--limit", type=int, default=None, help="statements per file (smoke runs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()

    settings = Settings()
    tier = RetrievalTier.load(settings=settings)
    tier.subject_gate = False  # time the key search itself (the subject gate, when on, narrows entries before it)
    with torch.no_grad():
        sentinel = tier.recipe.search_keys(tier.recipe.sentinel_key(tier.encoder)).flatten()
    scale, offset = tier.recipe.scale, tier.recipe.sentinel_offset
    dim = sentinel.numel()
    paths = [p for p in (args.train, args.val) if p.is_file()] or [bundled_counterfact_path()]
    edits = [e for p in paths for e in load_edits(p, limit=args.limit).requests]
    val = load_edits(paths[-1], limit=args.limit).requests
    val_offset = len(edits) - len(val)
    t0 = time.perf_counter()
    real_keys = torch.cat([tier.encode_edits(edits[i: i + 256])[0] for i in range(0, len(edits), 256)])
    para = [(val_offset + i, e.paraphrase_prompts[0]) for i, e in enumerate(val) if e.paraphrase_prompts]
    para_keys = _encode_queries(tier, [t for _, t in para])
    neighbours = [p.prompt for e in val for p in e.neighborhood_prompts[:1]][: args.neighbour_queries]
    neighbour_keys = _encode_queries(tier, neighbours)
    encode_s = time.perf_counter() - t0
    own_cos = (para_keys * real_keys[[i for i, _ in para]]).sum(1)
    print(f"encoded {len(edits)} statements and {len(para) + len(neighbours)} queries in {encode_s:.0f} s", flush=True)

    sizes = [int(s) for s in args.sizes.split(",")]
    prompt = torch.zeros(tier.recipe.config.prompt_tokens, 8)  # tiny and shared: 1e6 entries fit in memory
    filler = _unit_rows(max(sizes) - len(real_keys) + 1, dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    latency_texts = [t for _, t in para][: args.latency_queries]

    lazy = _lazy_crossing(real_keys, filler, prompt, sentinel, scale, offset, para_keys[:300], args.threshold)
    print(json.dumps({"lazy_crossing": lazy}), flush=True)
    gc.collect()

    rows = []
    for size in sizes:
        index = KnowledgeIndex(sentinel, scale, offset, ann=AnnConfig(min_entries=args.threshold))
        add_s = _fill(index, real_keys, filler, size, prompt)
        t0 = time.perf_counter()
        index.build_ann()
        build_s = time.perf_counter() - t0
        ann_stats = index.ann_stats
        assert ann_stats["active"], ann_stats
        exact = _exact_view(index)
        n_filler = size - len(real_keys)
        picked = torch.randperm(n_filler, generator=gen)[: args.recall_queries]
        cosines = own_cos[torch.randint(0, len(own_cos), (len(picked),), generator=gen)]
        perturbed = _perturbed(filler[picked], cosines, seed=3 + size)
        fresh = _unit_rows(args.random_queries, dim, seed=4 + size)
        latency_q = perturbed[: args.latency_queries]
        row = {
            "entries": size, "real_keys": len(real_keys), "add_entries_seconds": add_s,
            "ann_build_seconds": build_s, "ann_training_seconds": ann_stats["seconds_training"],
            "ann_pq_m": ann_stats["pq_m"], "ann_code_bytes_per_key": ann_stats["pq_m"] // 2,
            "search_seconds": {"exact": _search_latency(exact, latency_q), "ann": _search_latency(index, latency_q)},
            "lookup": {"exact": _lookup_latency(tier, exact, latency_texts),
                       "ann": _lookup_latency(tier, index, latency_texts),
                       "query_encoding_only_seconds": _encode_latency(tier, latency_texts)},
            "recall": {
                "perturbed_stored_keys": _agreement(index, exact, perturbed, [f"filler-{int(i)}" for i in picked]),
                "fresh_random_queries": _agreement(index, exact, fresh, None),
                "real_paraphrase_queries": _agreement(index, exact, para_keys, [f"real-{i}" for i, _ in para]),
                "real_neighbourhood_queries": _agreement(index, exact, neighbour_keys, None),
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del index, exact, perturbed, fresh
        tier.store = KnowledgeIndex(sentinel, scale, offset)
        gc.collect()

    config = AnnConfig(min_entries=args.threshold)
    by_size = {r["entries"]: r for r in rows}
    targets = {}
    if 100_000 in by_size:
        targets["lookup_p50_le_15ms_at_1e5"] = by_size[100_000]["lookup"]["ann"]["seconds"]["p50"] <= 0.015
    if 1_000_000 in by_size:
        targets["lookup_p50_le_30ms_at_1e6"] = by_size[1_000_000]["lookup"]["ann"]["seconds"]["p50"] <= 0.030
        targets["recall_at_1_ge_0.99_at_1e6_perturbed"] = (
            by_size[1_000_000]["recall"]["perturbed_stored_keys"]["recall_at_1"] >= 0.99)
        targets["recall_at_1_ge_0.99_at_1e6_real_paraphrases"] = (
            by_size[1_000_000]["recall"]["real_paraphrase_queries"]["recall_at_1"] >= 0.99)
    out = {
        "platform": {"cpu": _cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
                     "torch_threads": torch.get_num_threads(), "faiss_omp_threads": 1,
                     "note": args.note},
        "checkpoint": "smollm2-135m-recipe (shipped)", "checkpoint_id": checkpoint_id(default_checkpoint_path()),
        "key_dim": dim, "scale": scale, "sentinel_offset": offset,
        "ann_config": {"index": f"faiss.IndexPQFastScan(d={dim}, M={rows[0]['ann_pq_m']}, nbits=4, "
                                "METRIC_INNER_PRODUCT), top candidates re-scored exactly", **config.__dict__},
        "real_data": {"statements": len(edits), "paraphrase_queries": len(para), "neighbourhood_queries":
                      len(neighbours), "encode_seconds": encode_s,
                      "paraphrase_cos_to_own_key": {q: float(torch.quantile(own_cos, q)) for q in
                                                    (0.05, 0.25, 0.5, 0.75, 0.95)}},
        "lazy_crossing": lazy,
        "sizes": rows,
        "targets": targets,
        "seconds_total": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(json.dumps(targets), flush=True)


if __name__ == "__main__":
    main()
