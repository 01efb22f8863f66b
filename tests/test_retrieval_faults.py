"""Faults of the retrieval tier's store: a Redis outage leaves readers answering from their last in-memory copy,
and entries that fail validation (checksum, size, non-finite values) are never put in front of a query."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis
import torch

from tests.redis_servers import start_redis
from tests.test_retrieval import _repo, _tiny_edit, _unit
from workers.retrieval.repository import KnowledgeRepository


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis():
    """A real redis-server of our own (no persistence), so the test can take it down."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(["--port", str(port)], url)
    yield proc, port, url
    proc.kill()
    proc.wait()


def test_lookups_survive_a_redis_outage(own_redis, caplog) -> None:
    proc, port, url = own_redis
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    writer = KnowledgeRepository(_unit(3), 10.0, 0.0, (3, 2), "ckpt", url=url, prefix=prefix)
    reader = KnowledgeRepository(_unit(3), 10.0, 0.0, (3, 2), "ckpt", url=url, prefix=prefix,
                                 refresh_interval_s=0.0)
    writer.add(_tiny_edit(), "the capital of france is rome", _unit(0), torch.ones(3, 2))
    assert reader.lookup(_unit(0)) is not None and reader.stale_seconds == 0.0
    proc.kill()
    proc.wait()
    hit = reader.lookup(_unit(0))  # Redis is gone: the last in-memory copy answers, no exception
    assert hit is not None and hit.statement.endswith("rome")
    assert reader.stale_seconds > 0.0 and "serving the last in-memory copy" in caplog.text
    with pytest.raises(redis.RedisError):  # writes still fail loudly
        writer.add(_tiny_edit().model_copy(update={"edit_id": "x"}), "s", _unit(1), torch.ones(3, 2))
    subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while reader.stale_seconds > 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
        reader.lookup(_unit(0))
    assert reader.stale_seconds == 0.0 and "answers again" in caplog.text
    redis.Redis.from_url(url).shutdown(nosave=True)


def test_entries_that_fail_validation_are_never_served(redis_prefix: str, caplog) -> None:
    writer = _repo(redis_prefix)
    good, forged, wrong_size, nan = (_tiny_edit().model_copy(update={"edit_id": e})
                                     for e in ("good", "forged", "short", "nan"))
    for i, edit in enumerate((good, forged, wrong_size, nan)):
        writer.add(edit, "s", _unit(i % 3), torch.ones(3, 2))
    client = writer.redis
    # Someone with Redis access rewrites entries behind the repository's back.
    client.hset(f"{redis_prefix}:prompts", "forged", np.full(6, 9.0, dtype=np.float32).tobytes())
    client.hset(f"{redis_prefix}:keys", "short", np.ones(2, dtype=np.float32).tobytes())
    client.hdel(f"{redis_prefix}:sums", "short", "nan")  # no checksum to catch them: size and values still do
    nan_prompt = np.ones(6, dtype=np.float32)
    nan_prompt[3] = np.nan
    client.hset(f"{redis_prefix}:prompts", "nan", nan_prompt.tobytes())
    reader = _repo(redis_prefix)
    assert "good" in reader and not {"forged", "short", "nan"} & set(reader.index)
    assert reader.rejected_entries == 3
    assert "checksum mismatch" in caplog.text and "non-finite" in caplog.text and "size" in caplog.text
    # The same checks apply to changes replayed from the log.
    writer.add(good.model_copy(update={"edit_id": "late"}), "s", _unit(1), torch.ones(3, 2))
    client.hset(f"{redis_prefix}:prompts", "late", np.full(6, 7.0, dtype=np.float32).tobytes())
    reader.refresh()
    assert "late" not in reader
