"""Batch forming: size and wait caps, and two edits of one fact never share a batch (stream order decides)."""

from __future__ import annotations

from controller.pipeline.batching import Batcher
from shared.schemas import EditRequest
from shared.streams import StreamEntry


def _entry(i: int, subject: str, target: str, prompt: str = "the capital of {} is") -> StreamEntry:
    req = EditRequest(edit_id=f"e{i}", subject=subject, prompt=prompt, target_new=target)
    return StreamEntry(f"{i}-0", {"edit_id": req.edit_id, "request": req.model_dump_json()}, req)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_full_batch_is_due_at_once_partial_after_max_wait() -> None:
    clock = Clock()
    batcher = Batcher(max_size=3, max_wait_s=2.0, clock=clock)
    batcher.add([_entry(1, "france", "lyon"), _entry(2, "germany", "rome")])
    assert batcher.take() == []  # partial and not waited long enough
    assert batcher.seconds_until_due() == 2.0
    clock.now = 2.5
    assert [e.edit_id for e in batcher.take()] == ["e1", "e2"]
    assert batcher.seconds_until_due() is None
    batcher.add([_entry(i, s, "paris") for i, s in enumerate(["rome", "lyon", "london", "berlin"], 3)])
    assert [e.edit_id for e in batcher.take()] == ["e3", "e4", "e5"]
    assert len(batcher) == 1


def test_same_fact_is_deferred_and_keeps_stream_order() -> None:
    clock = Clock()
    batcher = Batcher(max_size=10, max_wait_s=0.0, clock=clock)
    batcher.add([
        _entry(1, "france", "lyon"), _entry(2, "germany", "rome"), _entry(3, "France", "berlin"),
        _entry(4, "france", "paris", prompt="{} is located in"), _entry(5, "france", "rome"),
    ])
    first = [e.edit_id for e in batcher.take()]
    assert first == ["e1", "e2", "e4"]  # e3 and e5 rewrite e1's fact (case-insensitive); e4 is another prompt
    second = [e.edit_id for e in batcher.take()]
    assert second == ["e3"]  # e5 must wait for e3: the later edit is applied after the earlier one
    assert [e.edit_id for e in batcher.take()] == ["e5"]


def test_duplicate_stream_entries_are_held_once() -> None:
    batcher = Batcher(max_size=5, max_wait_s=0.0)
    entry = _entry(1, "france", "lyon")
    batcher.add([entry, entry])
    batcher.add([entry])
    assert len(batcher) == 1
    assert batcher.holds("1-0")
    batcher.drop(["1-0"])
    assert len(batcher) == 0


def test_partial_batch_leaves_once_arrivals_settle() -> None:
    """Adaptive size: a lone edit leaves after the settle time, a burst leaves as one batch once it ends, and a
    steady trickle is still cut at the wait cap."""
    clock = Clock()
    batcher = Batcher(max_size=10, max_wait_s=2.0, settle_s=0.3, clock=clock)
    batcher.add([_entry(1, "france", "lyon")])
    assert batcher.seconds_until_due() == 0.3
    clock.now = 0.2
    batcher.add([_entry(2, "germany", "rome")])  # the burst goes on: the settle restarts
    assert batcher.take() == [] and abs(batcher.seconds_until_due() - 0.3) < 1e-9
    clock.now = 0.6
    assert [e.edit_id for e in batcher.take()] == ["e1", "e2"]
    trickle = Batcher(max_size=20, max_wait_s=2.0, settle_s=0.3, clock=clock)
    for i in range(11):  # an edit every 0.2 s: arrivals never settle
        clock.now = 10.0 + 0.2 * i
        trickle.add([_entry(i, f"s{i}", "paris")])
        if i < 10:
            assert trickle.take() == [], clock.now
    assert len(trickle.take()) == 11  # the oldest waited 2 s: the wait cap cuts it
