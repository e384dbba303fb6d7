"""Connection state recovery kept in Redis: sessions and a per-room event log.

Parts: offsets.py, keys.py, lua/ (package data) run by scripts.py, log.py,
sessions.py, catchup.py; `RecoveryStore` wires them. Invariants: offsets increase
strictly across rooms and instances; an event is replayed only if every
event after the client's offset in its rooms is still logged (never a
partial replay). Keys, dedup and costs: docs/recovery.md.
"""

from __future__ import annotations

from collections.abc import Callable

from . import catchup
from .keys import Keys
from .log import EventLog
from .offsets import ZERO_OFFSET, LoggedEvent, offset_key, parse_offset
from .sessions import RestoredSession, SessionStore, new_pid, token_fingerprint

__all__ = [
    "ZERO_OFFSET", "EventLog", "Keys", "LoggedEvent", "RecoveryStore", "RestoredSession", "SessionStore",
    "new_pid", "offset_key", "parse_offset", "token_fingerprint",
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
        self.listening_since = self.log.listening_since
        self.set_epoch = self.log.set_epoch
        self.create_session = self.sessions.create_session
        self.open_session = self.sessions.open_session
        self.touch = self.sessions.touch
        self.forget = self.sessions.forget
        self.restore = self.sessions.restore
        self._redis = redis

    async def read_since(self, rooms: list[str], offset: str, max_events: int = 10_000):
        """See catchup.read_since: what this instance's subscription missed."""
        return await catchup.read_since(self._redis, self.keys, rooms, offset, max_events)
