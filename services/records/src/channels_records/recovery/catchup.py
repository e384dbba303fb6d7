"""What an instance missed while its subscription was down: each room's
logged events after one offset, read back from the shared log (other
instances logged them meanwhile), for the sockets still connected here."""

from __future__ import annotations

import heapq

from .keys import Keys
from .offsets import LoggedEvent, offset_key, parse_offset

# Rooms read in one pipeline at most.
ROOMS_PER_ROUND_TRIP = 500


async def read_since(
    redis, keys: Keys, rooms: list[str], offset: str, max_events: int
) -> tuple[list[tuple[str, LoggedEvent]], list[str]]:
    """(room, event) pairs logged after `offset` in `rooms`, in offset order,
    and the rooms whose events cannot all be given: trimmed past `offset`
    (the per-room cap's mark) or beyond `max_events` in all. A room is
    either complete or listed as lost, never partly read."""
    after = offset_key(offset)
    per_room: list[list[tuple[tuple[int, int], str, LoggedEvent]]] = []
    lost: list[str] = []
    total = 0
    for start in range(0, len(rooms), ROOMS_PER_ROUND_TRIP):
        chunk = rooms[start:start + ROOMS_PER_ROUND_TRIP]
        pipe = redis.pipeline(transaction=False)
        for room in chunk:
            # The range first: a trim mark read after it covers the range.
            pipe.xrange(keys.room(room), "(" + offset, "+", count=max_events + 1)
            pipe.get(keys.trim(room))
        replies = await pipe.execute()
        for i, room in enumerate(chunk):
            entries, mark = replies[2 * i], replies[2 * i + 1]
            mark_key = parse_offset(mark.decode("ascii", "replace")) if isinstance(mark, bytes) else None
            if mark is not None and (mark_key is None or after < mark_key):
                lost.append(room)
                continue
            if total + len(entries) > max_events:
                lost.append(room)
                continue
            events = []
            for ident, fields in entries:
                ident = ident.decode() if isinstance(ident, bytes) else str(ident)
                key = parse_offset(ident)
                event, data = fields.get(b"e"), fields.get(b"d")
                if key is None or event is None or data is None:
                    continue  # not an entry of ours
                events.append((key, room, LoggedEvent(ident, event.decode("utf-8", "replace"), bytes(data))))
            total += len(events)
            per_room.append(events)
    merged = heapq.merge(*per_room, key=lambda item: item[0])
    return [(room, event) for _, room, event in merged], lost
