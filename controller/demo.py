"""``make demo``: the streaming pipeline end to end on this machine, with embedded defaults.

Starts what it needs (Redis: ``EDITQ_REDIS_URL``, else a running local server, else a private one; a local Ray
cluster; the controller and its edit workers), streams real CounterFact corrections into the edit stream in bursts
as an upstream system would, shows progress while versions are committed, then loads the newest committed version
from the weight store (base + deltas, checksum-verified) and prints before/after completions and edit metrics.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.runtime import ensure_redis, init_ray, start_controller, stop_controller
from shared.outcomes import EditState
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.streams import EditStreams
from shared.weight_store import LocalWeightStore, rebuild
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.layout import ModelLayout
from workers.evaluation.metrics import edit_metrics
from workers.model_io import load_model

DEMO_NAMESPACE = "demo"


@dataclass
class DemoConfig:
    n_edits: int = 50
    show: int = 5
    burst: int = 10  # edits per upstream burst
    burst_interval_s: float = 1.0
    batch_max_size: int = 25
    workers: int = 1
    timeout_s: float = 3600.0


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    batch = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()


async def _reset(settings: Settings) -> None:
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    await streams.delete_namespace()
    await streams.close()
    store = settings.resolved_store_dir()
    if store.exists():
        import shutil

        shutil.rmtree(store)


async def _stream_and_follow(settings: Settings, requests: list[EditRequest], cfg: DemoConfig,
                             console: Console) -> dict[str, str]:
    """Submit in bursts while showing how many edits are queued, in flight and applied."""
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    await streams.ensure_group()
    ids = [r.edit_id for r in requests]
    columns = (TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[note]}"))
    try:
        with Progress(*columns, console=console) as bars:
            sent_bar = bars.add_task("submitted", total=len(requests), note="")
            done_bar = bars.add_task("applied", total=len(requests), note="")
            sent, next_burst, deadline = 0, 0.0, time.monotonic() + cfg.timeout_s
            while time.monotonic() < deadline:
                if sent < len(requests) and time.monotonic() >= next_burst:
                    for request in requests[sent:sent + cfg.burst]:
                        await streams.submit(request)
                    sent = min(len(requests), sent + cfg.burst)
                    next_burst = time.monotonic() + cfg.burst_interval_s
                    bars.update(sent_bar, completed=sent)
                statuses = await streams.statuses(ids)
                states = {e: (s.state.value if s else "unknown") for e, s in statuses.items()}
                terminal = sum(s is not None and s.state.terminal for s in statuses.values())
                applied = sum(v == EditState.applied.value for v in states.values())
                flying = sum(v == EditState.in_flight.value for v in states.values())
                bars.update(done_bar, completed=applied,
                            note=f"head v{await streams.head()}, {flying} in flight, {terminal - applied} not applied")
                if sent == len(requests) and terminal == len(requests):
                    return states
                await asyncio.sleep(0.5)
        raise TimeoutError(f"edits not finished after {cfg.timeout_s:.0f} s")
    finally:
        await streams.close()


def run_demo(settings: Settings, cfg: DemoConfig, console: Console) -> None:
    redis = ensure_redis(settings)
    settings = settings.model_copy(update={
        "redis_url": redis.url, "namespace": DEMO_NAMESPACE, "batch_max_size": cfg.batch_max_size,
        "n_edit_workers": cfg.workers, "batch_max_wait_s": 2.0,
    })
    console.print(f"redis {redis.url}{' (private, started for the demo)' if redis.process else ''}; "
                  f"weight store {settings.resolved_store_dir()}")
    asyncio.run(_reset(settings))
    requests = load_edits(bundled_counterfact_path(), limit=cfg.n_edits).requests
    model_path = settings.resolved_model_path()
    model, tokenizer = load_model(model_path, device="cpu")
    shown = requests[: cfg.show]
    before = [greedy(model, tokenizer, r.text) for r in shown]
    pre = edit_metrics(model, tokenizer, requests, zsre=False)

    init_ray()
    console.print(f"starting the controller and {cfg.workers} edit worker(s) on a local Ray cluster "
                  "(the first run computes the model's key statistics once, a few minutes on 2 cores)")
    actor, run_ref = start_controller(settings)
    start = time.perf_counter()
    try:
        states = asyncio.run(_stream_and_follow(settings, requests, cfg, console))
        status = ray.get(actor.status.remote())
    finally:
        stop_controller(actor, run_ref)
    seconds = time.perf_counter() - start

    store = LocalWeightStore(settings.resolved_store_dir())
    layout = ModelLayout.from_model(model)
    layers = range(layout.num_layers)
    base = {layout.weight_name(i): layout.get_weight(model, i) for i in layers}
    head = status.head
    matrices = rebuild(store, base, head)  # every matrix checked against its manifest's sha256
    for i in layers:
        layout.set_weight(model, i, matrices[layout.weight_name(i)])
    after = [greedy(model, tokenizer, r.text) for r in shown]
    post = edit_metrics(model, tokenizer, requests, zsre=False)

    table = Table(title=f"{len(requests)} streamed CounterFact edits -> {head} weight versions ({seconds:.0f} s)")
    for col in ("prompt", "new target", "before", f"after (v{head})"):
        table.add_column(col, overflow="fold")
    for r, b, a in zip(shown, before, after, strict=True):
        table.add_row(r.text, r.target_new, b, a)
    console.print(table)
    metrics = Table(title="edit metrics (share of prompts)")
    for col in ("metric", "before", "after"):
        metrics.add_column(col)
    for key in ("efficacy", "generalization", "specificity"):
        metrics.add_row(key, f"{getattr(pre, key):.2f}", f"{getattr(post, key):.2f}")
    console.print(metrics)
    counts = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
    console.print(f"outcomes: {counts}; {len(requests) / seconds:.2f} edits/s end to end; "
                  f"follow any edit with `editq status <edit_id>` (EDITQ_NAMESPACE={DEMO_NAMESPACE})")
    redis.stop()
