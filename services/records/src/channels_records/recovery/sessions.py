"""Recovery sessions: a secret pid per connected socket, its rooms (or the
user record they follow from), its token's fingerprint and its connect
offset, expiring a window after the last sign of life; `restore` reads what
a returning client missed, for its rooms only, after its offset."""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import secrets
from dataclasses import dataclass

from channels_common import jsonin
from channels_common.auth import current_user_key, parse_current_user
from channels_common.redis_line import BatchedCalls, RedisLine
from channels_common.resp import pack_command
from redis.exceptions import NoScriptError, ResponseError

from ..rooms import rooms_for
from .keys import Keys
from .offsets import LoggedEvent, offset_key, parse_offset
from .scripts import CREATE_SESSION, OPEN_SESSION, RESTORE, Script

log = logging.getLogger("channels.records.recovery")

# A connect batch that Redis has not answered in this time drops its connection.
CONNECT_TIMEOUT_SECONDS = 5.0
_PID_RE = re.compile(r"\A[A-Za-z0-9_-]{16,128}\Z")


@dataclass(slots=True)
class RestoredSession:
    sid: str
    rooms: list[str]
    missed: list[LoggedEvent]


def new_pid() -> str:
    """A secret session id: what a client shows to recover its session."""
    return secrets.token_urlsafe(24)


def token_fingerprint(token: str | None) -> str:
    if token is None:
        return "none"
    return hashlib.sha256(b"channels-recovery-token\0" + token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """`max_replay`: missed events one restore replays at most (more: a
    fresh connection)."""

    def __init__(self, redis, keys: Keys, *, window_ms: int, max_replay: int = 10_000):
        self._redis = redis
        self.keys = keys
        self.window_ms = window_ms
        self.max_replay = max_replay
        self._create = Script(CREATE_SESSION)
        self._open = Script(OPEN_SESSION)
        self._restore = Script(RESTORE)
        # Connects: one EVALSHA each, on a line of their own (see open_session).
        self._connects = BatchedCalls(RedisLine(redis, CONNECT_TIMEOUT_SECONDS))

    async def create_session(
        self, sid: str, token: str | None, rooms: list[str], pid: str | None = None
    ) -> tuple[str, str]:
        """A new secret pid for a connected socket (or `pid`, one from
        `new_pid` already sent to it), and the offset at connect time (a
        client that gets no event before dropping recovers from it)."""
        pid = pid or new_pid()
        unique_rooms = list(dict.fromkeys(rooms))
        offset = await self._create(
            self._redis,
            [self.keys.session(pid), self.keys.last],
            [sid, json.dumps(unique_rooms), token_fingerprint(token), self.window_ms],
        )
        offset = offset.decode() if isinstance(offset, bytes) else str(offset)
        return pid, offset

    async def open_session(self, sid: str, token: str, pid: str | None = None) -> tuple[str, str, bytes | None]:
        """At connect, in one round trip: the record Rails stored for
        `token` (None when there is none) and a new session (secret pid,
        or `pid` as in create_session; connect offset) whose rooms follow
        from that record. Concurrent connects share round trips (a line of
        their own, pipelined)."""
        pid = pid or new_pid()
        keys = [self.keys.session(pid), self.keys.last, current_user_key(token)]
        args = [sid, token_fingerprint(token), self.window_ms]
        try:
            reply = await self._connects.call(pack_command("EVALSHA", self._open.sha, len(keys), *keys, *args))
        except NoScriptError:
            await self._open.load(self._redis)  # Redis lost its scripts (restart, SCRIPT FLUSH)
            reply = await self._connects.call(pack_command("EVALSHA", self._open.sha, len(keys), *keys, *args))
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            raise ResponseError("recovery: unexpected reply to open_session")
        user = reply[1] if len(reply) > 1 else None
        return pid, reply[0].decode(), user if isinstance(user, bytes) else None

    async def touch(self, pids: list[str]) -> None:
        """Restart the window of live (or just disconnected) sessions."""
        for start in range(0, len(pids), 1000):
            pipe = self._redis.pipeline(transaction=False)
            for pid in pids[start:start + 1000]:
                pipe.pexpire(self.keys.session(pid), self.window_ms)
            await pipe.execute()

    async def forget(self, pid: str) -> None:
        """The client disconnected on purpose: its session cannot be restored."""
        if isinstance(pid, str):
            await self._redis.delete(self.keys.session(pid))

    async def restore(self, pid: str, token: str | None, offset: str | None) -> RestoredSession | None:
        """The session of `pid` with every event of its rooms after `offset`
        (or after the connect offset when the client has none), or None when
        a fresh connection is the right answer. The session stays valid."""
        if not isinstance(pid, str) or not _PID_RE.match(pid):
            log.info("recovery refused", extra={"reason": "malformed session id"})
            return None
        if offset is not None and parse_offset(offset) is None:
            log.info("recovery refused", extra={"reason": "malformed offset"})
            return None
        if token is not None and not isinstance(token, str):
            return None
        keys = [self.keys.session(pid), self.keys.last]
        args = [token_fingerprint(token), offset or "", self.window_ms, self.max_replay, self.keys.room_prefix,
                self.keys.trim_prefix]
        reply = await self._restore(self._redis, keys, args)
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == b"rooms":
            # A session opened with open_session: its rooms, from its user record.
            rooms = rooms_for(parse_current_user(reply[1] or None))
            reply = await self._restore(self._redis, keys, [*args, json.dumps(rooms)])
        if not isinstance(reply, list):
            reason = reply.decode() if isinstance(reply, bytes) else str(reply)
            log.info("recovery refused", extra={"reason": _REASONS.get(reason, reason)})
            return None
        sid = reply[0].decode()
        rooms = jsonin.loads(reply[1], max_bytes=len(reply[1]))
        per_room: list[list[tuple[tuple[int, int], LoggedEvent]]] = []
        current: list[tuple[tuple[int, int], LoggedEvent]] = []
        i = 2
        while i < len(reply):
            item = reply[i]
            if item == b"" or item == "":
                per_room.append(current)
                current = []
                i += 1
                continue
            ident = item.decode()
            event = reply[i + 1].decode()
            current.append((offset_key(ident), LoggedEvent(ident, event, bytes(reply[i + 2]))))
            i += 3
        missed = [ev for _, ev in heapq.merge(*per_room, key=lambda pair: pair[0])]
        return RestoredSession(sid=sid, rooms=rooms, missed=missed)


_REASONS = {
    "unknown": "unknown or expired session",
    "token": "channel token differs from the session's",
    "ahead": "offset is newer than any logged event",
    "too_many": "too many missed events to replay",
    "trimmed": "missed more events than the log holds",
}
