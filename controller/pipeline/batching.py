"""Forming weight-update batches from the edit stream: size cap, wait cap, and no conflicting edits together.

Adaptive size: a partial batch goes out as soon as arrivals pause for ``settle_s`` (a burst is one batch), or when
its oldest edit waited ``max_wait_s``. The controller takes a batch only when its workers are free, so while one
batch computes the next one fills: under a backlog batches are full (throughput), at low load an edit leaves after
the short settle instead of the whole window (latency).

Two edits of the same subject and prompt must not share a batch: their closed-form solve would average them.
Stream order decides instead: the later one waits for the next batch, so it is applied after (and wins over) the
earlier one. Pure logic, no I/O, so it is tested on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from shared.streams import StreamEntry


def conflict_key(entry: StreamEntry) -> tuple[str, str]:
    """Edits with the same key rewrite the same fact."""
    assert entry.request is not None
    return entry.request.subject.casefold(), entry.request.prompt.casefold()


@dataclass
class Batcher:
    """Holds admitted entries in stream order and hands out batches."""

    max_size: int
    max_wait_s: float
    settle_s: float | None = None  # None: partial batches wait the whole max_wait_s
    clock: Callable[[], float] = time.monotonic
    _pending: list[StreamEntry] = field(default_factory=list)
    _since: float | None = None  # when the oldest pending entry arrived
    _last: float | None = None  # when the newest pending entry arrived

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be at least 1")

    def add(self, entries: Iterable[StreamEntry]) -> None:
        held = {e.stream_id for e in self._pending}
        held_before = len(self._pending)
        for entry in entries:
            if entry.request is None:
                raise ValueError(f"entry {entry.stream_id} has no valid request")
            if entry.stream_id not in held:
                self._pending.append(entry)
                held.add(entry.stream_id)
        if self._pending and self._since is None:
            self._since = self.clock()
        if self._pending and len(self._pending) > held_before:
            self._last = self.clock()

    def put_back(self, entries: Sequence[StreamEntry]) -> None:
        """Return a batch that could not be processed (the infrastructure failed) to the front, in order."""
        held = {e.stream_id for e in self._pending}
        self._pending = [e for e in entries if e.stream_id not in held] + self._pending
        if self._pending and self._since is None:
            self._since = self.clock()

    def __len__(self) -> int:
        return len(self._pending)

    def holds(self, stream_id: str) -> bool:
        return any(e.stream_id == stream_id for e in self._pending)

    def seconds_until_due(self) -> float | None:
        """How long until a partial batch is due; None when nothing is pending, 0 when a batch is ready."""
        if not self._pending:
            return None
        if len(self._pending) >= self.max_size:
            return 0.0
        assert self._since is not None
        due = self._since + self.max_wait_s
        if self.settle_s is not None and self._last is not None:
            due = min(due, self._last + self.settle_s)
        return max(0.0, due - self.clock())

    def take(self, force: bool = False) -> list[StreamEntry]:
        """The next batch if one is due (full, or the oldest entry waited ``max_wait_s``), else an empty list."""
        due = self.seconds_until_due()
        if due is None or (due > 0 and not force):
            return []
        batch: list[StreamEntry] = []
        keys: set[tuple[str, str]] = set()
        ids: set[str] = set()
        rest: list[StreamEntry] = []
        for entry in self._pending:
            key = conflict_key(entry)
            edit_id = entry.edit_id or entry.stream_id
            if len(batch) < self.max_size and key not in keys and edit_id not in ids:
                batch.append(entry)
                keys.add(key)
                ids.add(edit_id)
            else:
                # Once a fact is deferred, later edits of it are deferred too (keys stays blocked), keeping order.
                keys.add(key)
                rest.append(entry)
        self._pending = rest
        self._since = self._last = self.clock() if rest else None
        return batch

    def drop(self, stream_ids: Iterable[str]) -> None:
        gone = set(stream_ids)
        self._pending = [e for e in self._pending if e.stream_id not in gone]
        if not self._pending:
            self._since = self._last = None
