"""Connection state recovery kept in Redis: sessions and a per-room event log.

Parts: offsets.py (the offsets), keys.py (where things live), lua/ (the
scripts, package data) and scripts.py (running them), log.py (the log and
its batching), sessions.py (the session store); `RecoveryStore` wires them.

Socket.IO's recovery needs three things: a private session id (`pid`) handed
to the client at connect, an offset on every broadcast event, and a way to
replay what a returning client missed. Keeping them in Redis instead of
process memory lets a session survive a process restart (SIGTERM or SIGKILL)
and move to another instance behind a load balancer.

Keys (the prefix defaults to ``recovery:``)

- ``recovery:last`` (string): the newest offset handed out, shared by all
  rooms and instances. No TTL: it is one small value and must never go back.
- ``recovery:room:{room}`` (stream): the events of one room, entry id = the
  event's offset, fields ``e`` (event name) and ``d`` (the JSON argument).
  Trimmed on every append by age (``XADD MINID ~ now-window``) and by count
  (``XTRIM MAXLEN ~ max_events_per_room``), and expiring a window after its
  last append, so idle rooms vanish and memory stays below both window x
  traffic and rooms x cap (approximate trimming leaves at most one stream
  node, ~100 entries, of slack per room).
- ``recovery:trim:{room}`` (string, TTL = window): the first entry the
  per-room cap kept at its last trim (see "What survives what").
- ``recovery:dedup:{hash}`` (hash, TTL ``dedup_ms`` from the last use):
  who logged which occurrence of one payload (see "Dedup" below).
- ``recovery:session:{sha256(pid)}`` (hash, TTL = window, extended by
  ``touch`` and ``restore``): ``sid``, ``rooms`` (JSON list) or ``user``
  (the record Rails stored for the token at connect, which gives the rooms;
  ``open_session`` reads it and creates the session in one round trip), ``tok`` (a
  SHA-256 fingerprint of the channel token, never the token), ``off`` (the
  offset at connect time). The pid itself is not stored, so reading Redis
  does not reveal pids that could hijack a session.

Offsets are Redis stream ids ``"{ms}-{seq}"`` made by the log script from the
Redis clock: ``max(now, last)``, with the sequence bumped when the
millisecond does not move. They increase strictly across all rooms, so each
room's stream takes them as its own ids and a restore merges rooms by id.
They compare numerically (ms, then seq) and not as plain strings; callers
treat them as opaque (``offset_key`` orders them when needed).

Dedup. Rails PUBLISHes each message once and every instance receives it and
logs it (``log_batch``); the first call logs it, the others must get the same
offset. Rails may legitimately publish identical bytes twice, so the
identity of a message is (payload hash, n-th occurrence). Every instance
sees pub/sub messages in the same order, so its k-th sighting of a payload
is the k-th occurrence: the script keeps, per payload, the offsets of the
recent occurrences (``o:k``, with their log time ``t:k``) and per instance
the number of occurrences it has consumed (``c:{me}``). An instance that
starts listening after some occurrences were logged skips those logged
before its start (``t:k < start``), so a late joiner does not take an old
occurrence for a new one. ``{me}`` is instance id + start time, so a
restart, or a pub/sub reconnect reported through ``mark_live``, begins a
fresh count. A per-instance serial makes the script idempotent when the
client retries it after a lost reply. Limits: an instance lagging more than
``dedup_ms`` behind the first logger logs a second copy; an identical
payload republished within about a second of an instance's start may be
matched to the wrong occurrence.

What survives what. Everything lives in Redis: a process restart or a move
to another instance loses nothing. An entry is removed only when it is
older than the window, and a session lives only while it was connected
within the window (its TTL is refreshed while live and on disconnect), so
every event a live session could have missed by age is still in its rooms'
streams when it comes back. The count cap can remove events a session
missed: each count trim leaves ``recovery:trim:{room}`` = the first entry
kept, and restore refuses the whole recovery (``trimmed``) when the
client's offset is older than that mark in any of its rooms, rather than
replay with a hole (a client refused so missed at least what the log holds).
An offset older than the session's connect offset (socket.io-client keeps
its last offset across a fresh connection) counts from the connect offset:
events from before the session are not the session's. A Redis restart
without persistence loses sessions and logs: clients then get a fresh
connection. An evicted stream (``allkeys-lru``) loses its trim history with
it: the cap keeps the log small enough that LRU should pick colder keys.
While Redis is down ``log_batch`` answers with an error and the caller emits
live without an offset.

Cost. Logging is one EVALSHA per message; ``log_batch`` sends the messages
of one pub/sub read in one pipeline, and calls made while a round trip is
in flight are sent together in the next, in call order. ``restore`` is one
EVALSHA that reads, for each of the session's rooms only, the entries after
the client's offset (``XRANGE (offset +``): work in proportion to what the
client missed, never a scan of all traffic.
"""

from __future__ import annotations

from collections.abc import Callable

from .keys import Keys
from .log import EventLog
from .offsets import ZERO_OFFSET, LoggedEvent, offset_key, parse_offset
from .sessions import RestoredSession, SessionStore, token_fingerprint

__all__ = [
    "ZERO_OFFSET", "EventLog", "Keys", "LoggedEvent", "RecoveryStore", "RestoredSession", "SessionStore",
    "offset_key", "parse_offset", "token_fingerprint",
]


class RecoveryStore:
    """The event log and the session store over one Redis and one key
    prefix. Durations are milliseconds; see EventLog and SessionStore for
    the parameters."""

    def __init__(
        self,
        redis,
        *,
        window_ms: int,
        instance_id: str,
        prefix: str = "recovery:",
        dedup_ms: int = 10_000,
        max_replay: int = 10_000,
        max_events_per_room: int = 1000,
        log_timeout_seconds: float | None = 2.0,
        max_pending: int = 10_000,
        start_grace_ms: int = 1000,
        clock: Callable[[], int] | None = None,
    ):
        if window_ms <= 0:
            raise ValueError("window_ms must be positive")
        self.keys = Keys(prefix)
        self.window_ms = window_ms
        self.log = EventLog(
            redis, self.keys, window_ms=window_ms, instance_id=instance_id, dedup_ms=dedup_ms,
            max_events_per_room=max_events_per_room, log_timeout_seconds=log_timeout_seconds,
            max_pending=max_pending, start_grace_ms=start_grace_ms, clock=clock,
        )
        self.sessions = SessionStore(redis, self.keys, window_ms=window_ms, max_replay=max_replay)
        # What the relay and the connections call, bound once.
        self.log_batch = self.log.log_batch
        self.mark_live = self.log.mark_live
        self.create_session = self.sessions.create_session
        self.open_session = self.sessions.open_session
        self.touch = self.sessions.touch
        self.forget = self.sessions.forget
        self.restore = self.sessions.restore
