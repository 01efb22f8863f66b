"""Helpers for the pipeline tests: settings for an isolated namespace, edits the tiny model can read, polling."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path

import httpx
from redis import Redis

from shared.outcomes import EditOutcome, EditState
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.weight_store import LocalWeightStore, lineage

SUBJECTS = ["france", "germany", "london", "rome", "berlin", "paris", "lyon", "bbc", "sega", "sony", "danielle"]
PROMPTS = ["the capital of {} is", "{} is located in", "the language of {} is", "{} works at", "{} plays"]
TARGETS = ["lyon", "rome", "paris", "berlin", "london", "jazz", "piano", "music", "english", "french", "bbc"]


def tiny_requests(n: int, offset: int = 0) -> list[EditRequest]:
    """``n`` distinct facts over the tiny tokenizer's vocabulary, each with an explicit edit_id."""
    facts = list(itertools.product(PROMPTS, SUBJECTS))
    out = []
    for i in range(offset, offset + n):
        prompt, subject = facts[i % len(facts)]
        target = TARGETS[(i * 7 + 3) % len(TARGETS)]
        if target == subject:
            target = "jazz"
        out.append(EditRequest(edit_id=f"e{i}", subject=subject, prompt=prompt, target_new=target, source="test"))
    return out


def pipeline_settings(tmp_path: Path, model_dir: Path, redis_url: str, **overrides) -> Settings:
    base = dict(
        home=tmp_path / "home", model_path=model_dir, hparams_path=model_dir / "hparams.json", device="cpu",
        redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", worker_num_cpus=0.5,
        batch_max_size=4, batch_max_wait_s=0.3, batch_retries=1, retry_backoff_s=0.1, torch_threads=1,
    )
    base.update(overrides)
    return Settings(**base)


class Probe:
    """Synchronous reads of the pipeline's Redis state, for assertions."""

    def __init__(self, settings: Settings) -> None:
        self.redis = Redis.from_url(settings.redis_url, decode_responses=True)
        self.tag = "{" + settings.namespace + "}"
        self.store = LocalWeightStore(settings.resolved_store_dir())

    def state(self, edit_id: str) -> str | None:
        return self.redis.hget(f"{self.tag}:edit:{edit_id}", "state")

    def wait_terminal(self, edit_ids: list[str], timeout_s: float = 240.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {e: self.state(e) for e in edit_ids}
            if all(s in {x.value for x in EditState if x.terminal} for s in states.values()):
                return states
            time.sleep(0.3)
        raise TimeoutError(f"edits not terminal after {timeout_s} s: {states}")

    def wait_for(self, edit_id: str, states: set[str], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state(edit_id) in states:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{edit_id} never reached {states}")

    def outcomes(self) -> list[EditOutcome]:
        return [EditOutcome.model_validate_json(f["outcome"]) for _, f in self.redis.xrange(f"{self.tag}:outcomes")]

    def head(self) -> int:
        return int(self.redis.get(f"{self.tag}:head") or 0)

    def committed_manifests(self):
        return lineage(self.store, self.head())

    def dead_letters(self) -> list[dict[str, str]]:
        return [f for _, f in self.redis.xrange(f"{self.tag}:dlq")]

    def cleanup(self) -> None:
        for key in self.redis.scan_iter(match=f"{self.tag}:*", count=1000):
            self.redis.delete(key)


class ServedAPI:
    """The real HTTP API on a free port in a background thread (edits in, OpenAI-compatible queries out)."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        from controller.api.app import create_app
        from controller.pipeline.runtime import _free_port

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.secret = admin_key(settings, "pipeline-test")
        self.headers = {"Authorization": f"Bearer {self.secret}"}
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def admin_key(settings: Settings, name: str) -> str:
    """A fresh admin API key in ``settings``' namespace (the real key store on the real Redis)."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from controller.security.keys import KeyStore, Scope

    async def go() -> str:
        redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True)
        try:
            secret, _ = await KeyStore(redis, settings.namespace).create(name, [Scope.admin], "tests")
            return secret
        finally:
            await redis.aclose()

    return asyncio.run(go())
