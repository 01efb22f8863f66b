"""A newcomer's first `editq demo`: an empty EDITQ_HOME except the fetched models (so no cached statistics, spectra or
versions), the real controller, edit worker, vLLM replica and HTTP API. It must complete, apply the edits and serve
changed answers; start-up waits on what the system reports, and everything is shut down afterwards."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray
from rich.console import Console

from controller.cli.demo import DemoConfig, run_demo
from shared.settings import DEFAULT_MODEL_NAME, Settings
from shared.streams import EditStreams
from tests.test_demo_teardown import actor_gone
from workers.stats_prep import plan_statistics

pytestmark = pytest.mark.slow


async def _drop_namespace(redis_url: str, namespace: str) -> None:
    streams = EditStreams.from_url(redis_url, namespace)
    await streams.delete_namespace()
    await streams.close()


def test_demo_on_a_fresh_home(tmp_path, redis_url, monkeypatch) -> None:
    models = Settings().models_dir
    if not (models / DEFAULT_MODEL_NAME / "config.json").exists():
        pytest.fail(f"no fetched models in {models}: run `make setup` (editq models fetch) first")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models)  # the models only: nothing else a first run would find cached
    monkeypatch.setenv("EDITQ_HOME", str(home))
    settings = Settings(home=home, redis_url=redis_url, device="cpu")
    assert all(plan.missing for plan in plan_statistics(settings))  # truly no statistics yet

    namespace = f"test-demo-{uuid.uuid4().hex[:8]}"
    cfg = DemoConfig(n_edits=4, show=4, burst=4, batch_max_size=4, replicas=1, namespace=namespace)
    console = Console(record=True, width=200)
    ray_before = ray.is_initialized()
    try:
        result = run_demo(settings, cfg, console)
    finally:
        asyncio.run(_drop_namespace(redis_url, namespace))
    out = console.export_text()

    assert not any(plan.missing for plan in plan_statistics(settings))  # the worker computed them on the way
    assert "the edit worker computes them first from text shipped with editq" in out
    assert "replica test-demo-" in out and "ready at v0" in out and "edit worker(s) ready" in out
    states = {edit_id: s.state.value for edit_id, s in result.finals.items()}
    assert set(states.values()) == {"applied"}, states
    assert result.head >= 1
    assert [v for _, v in result.before] == [0] * 4 and [v for _, v in result.after] == [result.head] * 4
    changed = [a != b for (b, _), (a, _) in zip(result.before, result.after, strict=True)]
    assert sum(changed) >= 3, (result.before, result.after)
    assert result.post.efficacy > result.pre.efficacy
    # Torn down: the controller and its replica are gone (a Ray cluster the demo started is shut down).
    assert ray.is_initialized() == ray_before
    if ray.is_initialized():
        assert actor_gone(f"{namespace}-controller") and actor_gone(f"{namespace}-replica-0")
