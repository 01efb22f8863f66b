"""Re-claiming stuck stream entries and dead-lettering poison ones.

An entry stays pending when the consumer that read it died before acknowledging it. The janitor takes over entries
idle longer than ``claim_idle_s``; an entry delivered more than ``max_deliveries`` times (it keeps killing whoever
reads it) goes to the dead-letter stream with the reason, and its edit gets a terminal ``failed`` outcome, so the
pipeline keeps flowing and nothing ends in silence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared.outcomes import ReasonCode
from shared.streams import EditStreams, StreamEntry

log = logging.getLogger("editq.janitor")


async def dead_letter_if_poison(
    streams: EditStreams, entries: list[StreamEntry], max_deliveries: int
) -> list[StreamEntry]:
    """Dead-letter entries delivered more than ``max_deliveries`` times; return the others."""
    if not entries:
        return []
    counts = await streams.deliveries([e.stream_id for e in entries])
    keep = []
    for entry in entries:
        n = counts.get(entry.stream_id, 1)
        if n > max_deliveries:
            reason = f"delivered {n} times without reaching an outcome (limit {max_deliveries})"
            log.error("dead-lettering %s (%s): %s", entry.stream_id, entry.edit_id, reason)
            await streams.dead_letter(entry, ReasonCode.max_deliveries, reason, n)
        else:
            keep.append(entry)
    return keep


async def sweep(
    streams: EditStreams,
    consumer: str,
    min_idle_ms: int,
    max_deliveries: int,
    held: Callable[[str], bool],
) -> tuple[list[StreamEntry], int]:
    """Claim idle entries of any consumer for ``consumer``; dead-letter those past the delivery limit.

    ``held`` tells which entries this consumer is already working on (they look idle while a long batch runs).
    Returns the claimed entries and how many were dead-lettered.
    """
    rows = [r for r in await streams.idle_pending(min_idle_ms) if not held(r["message_id"])]
    if not rows:
        return [], 0
    claimable: list[str] = []
    dead = 0
    for row in rows:
        sid, delivered = row["message_id"], int(row["times_delivered"])
        if delivered >= max_deliveries:  # claiming would make it delivered > max_deliveries times
            fields = await streams.fetch(sid)
            entry = StreamEntry.parse(sid, fields or {})
            reason = f"pending at {row['consumer']} after {delivered} deliveries (limit {max_deliveries})"
            log.error("dead-lettering %s: %s", sid, reason)
            await streams.dead_letter(entry, ReasonCode.max_deliveries, reason, delivered)
            dead += 1
        else:
            claimable.append(sid)
    claimed = await streams.claim(consumer, claimable, min_idle_ms)
    if claimed:
        log.warning("re-claimed %d idle entries for %s", len(claimed), consumer)
    return claimed, dead
