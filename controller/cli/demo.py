"""``make demo``: the whole system end to end on this machine, with embedded defaults.

Starts what it needs (Redis: ``EDITQ_REDIS_URL``, else a running local server, else a private one; a local Ray
cluster; the controller, its edit workers, vLLM serving replicas and the HTTP API), asks the served model about
facts through the OpenAI-compatible endpoint, streams real CounterFact corrections into the edit stream in bursts as
an upstream system would, shows progress while versions are committed and rolled out canary-first, asks the
replicas again (read-your-writes on the final version), and prints edit metrics computed on the newest version
rebuilt from the weight store (base + deltas, checksum-verified).

On a fresh machine starting takes minutes (vLLM engines; the edit worker's key statistics when ``make setup`` did
not compute them): the demo waits on what the controller and the router report (worker and replica states), says
what it is waiting for, and gives up early when a component fails. Its teardown is bounded and always removes the
controller, the replicas, the Ray cluster it started and a private Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import ray
import torch
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.api.app import create_app
from controller.cli.demo_wait import describe_worker, wait_ready
from controller.pipeline.runtime import _free_port, ensure_redis, init_ray, start_controller, stop_controller
from shared.outcomes import EditState, EditStatus
from shared.schemas import EditRequest
from shared.settings import Settings, redacted_url
from shared.streams import EditStreams
from shared.weight_store import LocalWeightStore, rebuild
from workers.assets import quiet_transformers
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.layout import ModelLayout
from workers.evaluation.metrics import EditMetrics, edit_metrics
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
    replicas: int = 2  # vLLM serving replicas (0: no serving tier, the demo then reads the store only)
    timeout_s: float = 3600.0
    namespace: str = DEMO_NAMESPACE  # Redis keys, weight store and replica names (reset at the start)


@dataclass
class DemoResult:
    """What the demo showed, for callers and tests: outcomes, answers before/after (text, version), metrics."""

    head: int
    finals: dict[str, EditStatus | None]
    before: list[tuple[str, int]]
    after: list[tuple[str, int]]
    pre: EditMetrics
    post: EditMetrics
    seconds: float
    startup_s: float = 0.0
    answers_served: bool = field(default=True)


class DemoAPI:
    """The HTTP API (edits, OpenAI-compatible queries) served from a background thread for the demo's duration."""

    def __init__(self, settings: Settings) -> None:
        self.url = f"http://127.0.0.1:{settings.api_port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api_port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.05)
        self.secret = asyncio.run(_demo_key(settings)) if settings.auth else None
        self.headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}

    def replicas(self) -> list[dict]:
        """Each replica's name, state, version and error, as the router sees them (``/v1/versions``)."""
        return httpx.get(f"{self.url}/v1/versions", headers=self.headers, timeout=30).json()["replicas"]

    def ask(self, prompts: list[str], min_version: int | None = None, retry_s: float = 120) -> list[tuple[str, int]]:
        """Greedy completions through ``/v1/completions``, with the weight version that produced each.

        Called once the replicas are ready, so a 503 only means a swap is in progress: retried for ``retry_s``.
        """
        body = {"prompt": prompts, "max_tokens": 8, "temperature": 0, "min_version": min_version}
        deadline = time.monotonic() + retry_s
        while True:
            response = httpx.post(f"{self.url}/v1/completions", json=body, headers=self.headers, timeout=300)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(1)
        response.raise_for_status()
        payload = response.json()
        versions = payload["editq"]["versions"]  # one per prompt, in order
        return [(c["text"].strip(), v) for c, v in zip(payload["choices"], versions, strict=True)]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    batch = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()


DEMO_STORE_MARK = ".editq-demo-store"


class ForeignStoreError(RuntimeError):
    """The configured weight store holds versions the demo did not write: it is never deleted."""


async def _demo_key(settings: Settings) -> str:
    """An admin key in the demo's own namespace (reset with it), so the demo talks to its API as any client."""
    from controller.cli.keys import operator
    from controller.security.keys import KeyStore, Scope

    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    try:
        secret, _ = await KeyStore(streams.redis, settings.namespace).create("demo", [Scope.admin], operator())
        return secret
    finally:
        await streams.close()


async def _reset(settings: Settings) -> None:
    """Start from nothing: the demo namespace in Redis and the demo's own weight store. A store the demo did not
    create (no mark file, e.g. EDITQ_STORE_DIR pointing at a real deployment's) is refused, never deleted."""
    store = settings.resolved_store_dir()
    chosen = settings.store_dir is not None  # the default demo store under EDITQ_HOME is always the demo's own
    if chosen and store.exists() and any(store.iterdir()) and not (store / DEMO_STORE_MARK).exists():
        raise ForeignStoreError(
            f"the weight store {store} was not created by the demo; refusing to reset it (unset EDITQ_STORE_DIR or "
            "point it at an empty directory)"
        )
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    await streams.delete_namespace()
    await streams.close()
    if store.exists():
        import shutil

        shutil.rmtree(store)
    store.mkdir(parents=True)
    (store / DEMO_STORE_MARK).write_text("written by `editq demo`; the demo resets this store on each run\n")


async def _tier_answer(api: DemoAPI, request: EditRequest, timeout_s: float = 30) -> tuple[str, float] | None:
    """The served answer once the retrieval tier holds the edit (seconds after submission), or None."""
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=120, headers=api.headers) as client:
        while time.monotonic() - start < timeout_s:
            body = {"prompt": request.text, "max_tokens": 8, "temperature": 0}
            payload = (await client.post(f"{api.url}/v1/completions", json=body)).json()
            retrieved = payload.get("editq", {}).get("retrieved", [None])[0]
            if retrieved and retrieved["edit_id"] == request.edit_id:
                return payload["choices"][0]["text"].strip(), time.monotonic() - start
            await asyncio.sleep(0.2)
    return None


async def _stream_and_follow(settings: Settings, requests: list[EditRequest], cfg: DemoConfig,
                             console: Console, api: DemoAPI | None = None) -> dict[str, EditStatus | None]:
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
                    first_burst = sent == 0
                    sent = min(len(requests), sent + cfg.burst)
                    next_burst = time.monotonic() + cfg.burst_interval_s
                    bars.update(sent_bar, completed=sent)
                    if first_burst and api and settings.retrieval_enabled:
                        answer = await _tier_answer(api, requests[0])
                        if answer:
                            hit = requests[0].target_new.lower() in answer[0].lower()
                            verdict = ("[green]the new target[/]" if hit else "[yellow]not yet the new target[/] "
                                       "(the shipped RECIPE heads reach it on ~2/3 of edits; the weights follow)")
                            bars.console.print(
                                f"[cyan]retrieval tier[/]: {answer[1]:.1f} s after submission, while the weights are "
                                f"still being computed, the replicas retrieve {requests[0].edit_id} and answer "
                                f"{requests[0].text!r} -> {answer[0]!r}: {verdict} {requests[0].target_new!r}"
                            )
                statuses = await streams.statuses(ids)
                states = {e: (s.state.value if s else "unknown") for e, s in statuses.items()}
                terminal = sum(s is not None and s.state.terminal for s in statuses.values())
                applied = sum(v == EditState.applied.value for v in states.values())
                flying = sum(v == EditState.in_flight.value for v in states.values())
                bars.update(done_bar, completed=applied,
                            note=f"head v{await streams.head()}, {flying} in flight, {terminal - applied} not applied")
                if sent == len(requests) and terminal == len(requests):
                    return statuses
                await asyncio.sleep(0.5)
        raise TimeoutError(f"edits not finished after {cfg.timeout_s:.0f} s")
    finally:
        await streams.close()


def run_demo(settings: Settings, cfg: DemoConfig, console: Console) -> DemoResult:
    """Run the demo; whatever happens, stop what it started (Ray cluster, private Redis) before returning."""
    redis = ensure_redis(settings)
    own_ray = not ray.is_initialized()
    try:
        return _run(redis.url, settings, cfg, console, private_redis=redis.process is not None)
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
        redis.stop()


def _run(redis_url: str, settings: Settings, cfg: DemoConfig, console: Console, private_redis: bool) -> DemoResult:
    settings = settings.model_copy(update={
        "redis_url": redis_url, "namespace": cfg.namespace, "batch_max_size": cfg.batch_max_size,
        "n_edit_workers": cfg.workers, "batch_max_wait_s": 2.0, "serving_replicas": cfg.replicas,
        "serving_replica_num_cpus": 0.5, "worker_num_cpus": 1.0, "api_port": _free_port(),
    })
    console.print(f"redis {redacted_url(redis_url)}{' (private, started for the demo)' if private_redis else ''}; "
                  f"weight store {settings.resolved_store_dir()}")
    asyncio.run(_reset(settings))
    requests = load_edits(bundled_counterfact_path(), limit=cfg.n_edits).requests
    shown = requests[: cfg.show]

    init_ray()
    engines = "; each vLLM engine takes a minute or more to start" if cfg.replicas else ""
    console.print(f"starting the controller, {cfg.workers} edit worker(s) and {cfg.replicas} vLLM replica(s) on a "
                  f"local Ray cluster, in parallel ({describe_worker(settings)}{engines})")
    started = time.monotonic()
    actor, run_ref = start_controller(settings)  # replicas and workers start in parallel, in the background
    api: DemoAPI | None = None
    ready = False
    try:
        api = DemoAPI(settings) if cfg.replicas else None
        with console.status("measuring the base model on the edits while the system starts..."):
            with quiet_transformers():
                model, tokenizer = load_model(settings.resolved_model_path(), device="cpu")
            pre = edit_metrics(model, tokenizer, requests, zsre=False)
        wait_ready(actor, run_ref, api.replicas if api else None, settings, console)
        startup_s, ready = time.monotonic() - started, True
        if api is not None:
            if api.secret:
                console.print(f"the API at {api.url} takes 'Authorization: Bearer <key>'; the demo's admin key: "
                              f"{api.secret}")
            console.print(f"asking the served model through {api.url}/v1/completions ...")
            before = api.ask([r.text for r in shown])
        else:
            before = [(greedy(model, tokenizer, r.text), 0) for r in shown]
        start = time.perf_counter()
        finals = asyncio.run(_stream_and_follow(settings, requests, cfg, console, api))
        seconds = time.perf_counter() - start
        status = ray.get(actor.status.remote(), timeout=60)
        after = api.ask([r.text for r in shown], min_version=status.live) if api is not None else None
    finally:
        with console.status("shutting down the API, the controller, its workers and the replicas..."):
            if api is not None:
                api.close()
            # A controller still starting cannot leave its loop before its workers are prepared: no long wait then.
            stop_controller(actor, run_ref, timeout_s=30 if ready else 5, raise_errors=False, settings=settings)

    store = LocalWeightStore(settings.resolved_store_dir())
    layout = ModelLayout.from_model(model)
    layers = range(layout.num_layers)
    base = {layout.weight_name(i): layout.get_weight(model, i) for i in layers}
    head = status.head
    matrices = rebuild(store, base, head)  # every matrix checked against its manifest's sha256
    for i in layers:
        layout.set_weight(model, i, matrices[layout.weight_name(i)])
    if after is None:
        after = [(greedy(model, tokenizer, r.text), head) for r in shown]
    post = edit_metrics(model, tokenizer, requests, zsre=False)
    result = DemoResult(head, finals, before, after, pre, post, seconds, startup_s, answers_served=api is not None)
    _report(result, requests, shown, settings.namespace, console)
    return result


def _report(result: DemoResult, requests: list[EditRequest], shown: list[EditRequest], namespace: str,
            console: Console) -> None:
    source = "served by vLLM replicas via /v1/completions" if result.answers_served else "from the weight store"
    table = Table(title=f"{len(requests)} streamed CounterFact edits -> weight version {result.head} "
                        f"({result.seconds:.0f} s); answers {source}")
    for col in ("prompt", "new target", "before", "after"):
        table.add_column(col, overflow="fold")
    for r, (b, bv), (a, av) in zip(shown, result.before, result.after, strict=True):
        table.add_row(r.text, r.target_new, f"{b} [dim](v{bv})[/]", f"{a} [dim](v{av})[/]")
    console.print(table)
    in_weights = sum(1 for st in result.finals.values() if st and st.served_by and st.served_by.value == "weights")
    metrics = Table(title=f"edit metrics on version {result.head}, rebuilt from the store (share of prompts; "
                          f"weights alone: {in_weights} of {len(requests)} edits are in them)")
    for col in ("metric", "before", "after"):
        metrics.add_column(col)
    for key in ("efficacy", "generalization", "specificity"):
        metrics.add_row(key, f"{getattr(result.pre, key):.2f}", f"{getattr(result.post, key):.2f}")
    console.print(metrics)
    finals = result.finals
    counts = Counter(s.state.value for s in finals.values() if s)
    served = Counter(f"{s.served_by.value}" + (f" ({s.reason_code.value})" if s.reason_code else "")
                     for s in finals.values() if s and s.served_by)
    if any(s and s.reason_code and s.reason_code.value == "health_budget" for s in finals.values()):
        console.print("health budget: once a version would take the model past its limits (KL, perplexity, known "
                      "facts vs the base model; docs/health.md), the weights refuse and the retrieval tier serves")
    console.print(f"outcomes: {dict(sorted(counts.items()))}; served by: {dict(sorted(served.items()))}; "
                  f"{len(requests) / result.seconds:.2f} edits/s end to end (start-up {result.startup_s:.0f} s "
                  f"before); follow any edit with `editq status <edit_id>` (EDITQ_NAMESPACE={namespace})")
