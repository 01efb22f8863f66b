"""Start-up waits end on the system's own failure signals, and teardown is bounded and complete even for a controller
that never finished starting (real Redis and Ray; a model directory that does not exist makes the worker fail)."""

from __future__ import annotations

import io
import time
import uuid

import pytest
import ray
from rich.console import Console

from controller.cli.demo_wait import StartupError, wait_ready
from controller.pipeline.runtime import controller_name, start_controller, stop_controller
from shared.settings import Settings


def actor_gone(name: str, timeout_s: float = 15.0) -> bool:
    """True once Ray no longer knows the named actor (``ray.kill`` is asynchronous: the name lingers briefly)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


def test_failed_start_ends_the_wait_and_teardown_is_bounded(ray_session, redis_url, tmp_path) -> None:
    settings = Settings(
        home=tmp_path / "home", model_path=tmp_path / "no-such-model", redis_url=redis_url, device="cpu",
        namespace=f"test-{uuid.uuid4().hex[:10]}", worker_num_cpus=0.5, retrieval_enabled=False,
    )
    actor, run_ref = start_controller(settings)
    started = time.monotonic()
    with pytest.raises(StartupError, match="the controller failed while starting") as failure:
        wait_ready(actor, run_ref, None, settings, Console(file=io.StringIO()), poll_s=0.2)
    assert "no-such-model" in str(failure.value)  # the worker's own error reaches the person waiting
    assert time.monotonic() - started < 120  # long before any time limit (worker_call_timeout_s is 900 s)

    started = time.monotonic()
    assert stop_controller(actor, run_ref, timeout_s=5, raise_errors=False) is None
    assert time.monotonic() - started < 30
    assert actor_gone(controller_name(settings))
