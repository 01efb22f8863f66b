"""Private real redis-servers for tests that take Redis down or lock it (no persistence, a free port each)."""

from __future__ import annotations

import subprocess
import time

import redis


def start_redis(args: list[str], url: str, timeout_s: float = 10.0) -> subprocess.Popen:
    """``redis-server *args``, returned once ``url`` answers PING (killed and re-raised if it never does)."""
    proc = subprocess.Popen(["redis-server", "--save", "", "--appendonly", "no", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def stop_redis(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
