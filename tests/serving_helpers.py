"""Helpers of tests/test_serving.py: the served versions it commits, the replica handles it shares, the query
load it runs during rollouts (kept apart so the test module holds only fixtures and tests)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import psutil
import ray
from fastapi import FastAPI

from controller.api.openai_api import build_openai_router
from controller.rollout.rolling import RolloutManager
from controller.rollout.router import (
    RayReplicaClient,
    Router,
    replica_clients,
)
from shared.schemas import EditRequest
from shared.streams import EditStreams
from shared.weight_store import LocalWeightStore
from workers.datasets import bundled_counterfact_path, load_edits
from workers.serving.config import ServingSettings
from workers.serving.devtools import commit_edits, commit_scaled, store_base_reference
from workers.serving.schemas import GenerateRequest
from workers.serving.weights import BaseReader

EDIT_RECORDS = (0, 2, 4)  # bundled CounterFact records whose new target SmolLM2 does not answer before the edit
CONTROLS = {"The capital of France is": "Paris", "The capital of Germany is": "Berlin",
            "The official language of Japan is": "Japanese"}
EDITED, COLLAPSED = 1, 2


@dataclass
class Serving:
    settings: ServingSettings
    runner: asyncio.Runner
    clients: list[RayReplicaClient]
    router: Router
    manager: RolloutManager
    streams: EditStreams
    requests: list[EditRequest]
    before: dict[str, dict[str, str]] = field(default_factory=dict)  # replica -> prompt -> greedy text at v0
    chat_v0: dict = field(default_factory=dict)  # /v1/chat/completions answer before any rollout
    started: list = field(default_factory=list)  # each replica's status once ready at version 0

    def run(self, coro):
        return self.runner.run(coro)


def commit_versions(settings: ServingSettings) -> list[EditRequest]:
    """Version 1: three real CounterFact edits (AlphaEdit, SmolLM2's tuned layers; context templates off to keep
    the editor to ~1-2 min on 2 cores), with its reference answers, and version 0's, as edit workers store them.
    Version 2: version 1 with every edited matrix negated (a collapse; stored without reference answers)."""
    from workers.editing.editor import Editor
    from workers.editing.hparams import default_hparams
    from workers.editing.stats import SecondMomentCache, StatsCorpus
    from workers.model_io import load_model, model_fingerprint

    path = settings.resolved_model_path()
    model, tokenizer = load_model(path, device="cpu")
    fingerprint = model_fingerprint(path)
    records = load_edits(bundled_counterfact_path(), limit=max(EDIT_RECORDS) + 1).requests
    requests = [records[i] for i in EDIT_RECORDS]
    hp = default_hparams(model.config, "alphaedit").with_overrides(n_context_templates=0)
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    store = LocalWeightStore(settings.resolved_store_dir())
    store_base_reference(store, model, tokenizer)
    manifest = commit_edits(store, Editor(model, tokenizer, hp, stats, fingerprint), requests, EDITED, 0,
                            fingerprint)
    names = [e.name for e in manifest.matrices]
    commit_scaled(store, BaseReader(path), names, COLLAPSED, EDITED, -1.0, fingerprint)
    return requests


async def greedy(client, prompts: list[str], max_tokens: int = 8) -> dict[str, str]:
    results = await asyncio.gather(*(
        client.generate(GenerateRequest(prompt=p, max_tokens=max_tokens, temperature=0.0)) for p in prompts
    ))
    return {p: r.text for p, r in zip(prompts, results, strict=True)}



CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def openai_client(settings: ServingSettings, streams: EditStreams) -> httpx.AsyncClient:
    """The API process's path: replicas found by name, an APIRouter in a FastAPI app."""
    app = FastAPI()
    router = Router(replica_clients(settings), settings)
    app.include_router(build_openai_router(lambda: router, settings.served_model_name(), lambda: streams))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


async def chat_once(settings: ServingSettings, streams: EditStreams) -> dict:
    async with openai_client(settings, streams) as http:
        response = await http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 16, "temperature": 0})
        assert response.status_code == 200, response.text
        return response.json()


async def replica_statuses(serving: Serving) -> list:
    return list(await asyncio.gather(*(c.status() for c in serving.clients)))


async def open_streams(settings: ServingSettings) -> EditStreams:
    return EditStreams.from_url(settings.redis_url, settings.namespace)


@dataclass
class Load:
    """Continuous greedy queries through the router (plain and streamed) while something else happens."""

    router: Router
    prompts: list[str]
    records: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: bool = False

    async def worker(self, seed: int, streamed: bool) -> None:
        rng = random.Random(seed)
        while not self.stop:
            request = GenerateRequest(prompt=rng.choice(self.prompts), max_tokens=24, temperature=0.0)
            t0 = time.monotonic()
            try:
                if streamed:
                    chunks = [c async for c in self.router.stream(request)]
                    versions = {c.version for c in chunks}
                    self.records.append({"version": min(versions), "stamps": versions, "replica": chunks[0].replica,
                                         "engine": None, "t0": t0, "t1": time.monotonic()})
                else:
                    r = await self.router.generate(request)
                    self.records.append({"version": r.version, "stamps": {r.version}, "replica": r.replica,
                                         "engine": r.engine_versions, "t0": t0, "t1": time.monotonic()})
            except Exception as err:
                self.errors.append(f"{type(err).__name__}: {err}")



def sse_events(body: str) -> list[dict]:
    import json

    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]




def engine_child_pids(client: RayReplicaClient) -> list[int]:
    """Processes the replica actor started (vLLM's engine core and its worker)."""
    pid = ray.get(client.handle.__ray_call__.remote(lambda self: os.getpid()))
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]
