"""Connection state recovery kept in Redis: sessions and a per-room event log.

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
- ``recovery:dedup:{hash}`` (hash, TTL ``dedup_seconds`` from the last use):
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
calls ``log_message``; the first call logs it, the others must get the same
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
``dedup_seconds`` behind the first logger logs a second copy; an identical
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
While Redis is down ``log_message`` raises and the caller emits live without
an offset.

Cost. ``log_message`` is one EVALSHA per message; ``log_messages`` sends
the messages of one pub/sub read in one pipeline, and calls made while a
round trip is in flight are sent together in the next, in call order. ``restore`` is one
EVALSHA that reads, for each of the session's rooms only, the entries after
the client's offset (``XRANGE (offset +``): work in proportion to what the
client missed, never a scan of all traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from channels_common.auth import current_user_key, parse_current_user
from channels_common.redis import RespConnection
from channels_common.resp import ProtocolError, ReplyError, pack_command
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .rooms import rooms_for

log = logging.getLogger("channels.records.recovery")

ZERO_OFFSET = "0-0"
_OFFSET_RE = re.compile(r"\A([0-9]{1,16})-([0-9]{1,16})\Z")
_MAX_ID_PART = 2**53  # Lua compares ids as doubles: keep them exact
_PID_RE = re.compile(r"\A[A-Za-z0-9_-]{16,128}\Z")
# A new instance counts occurrences logged before (its start - this) as not
# seen: covers clock skew and the time between subscribing and the first call.
_START_GRACE_MS = 1000
# Log calls sent in one pipeline at most: bounds the reply buffer and lets
# results reach callers in steady steps during a burst.
_MAX_BATCH = 500
# A log call or batch that Redis has not answered in this time drops its connection.
_LOG_LINE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    offset: str
    event: str
    data: bytes


@dataclass(slots=True)
class RestoredSession:
    sid: str
    rooms: list[str]
    missed: list[LoggedEvent]


def parse_offset(offset: object) -> tuple[int, int] | None:
    """(ms, seq) of a well-formed offset, else None. Input may be hostile."""
    if not isinstance(offset, str):
        return None
    m = _OFFSET_RE.match(offset)
    if not m:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms >= _MAX_ID_PART or seq >= _MAX_ID_PART:
        return None
    return ms, seq


def offset_key(offset: str) -> tuple[int, int]:
    """Sort key of an offset produced by this module."""
    parsed = parse_offset(offset)
    if parsed is None:
        raise ValueError("not an offset")
    return parsed


def token_fingerprint(token: str | None) -> str:
    if token is None:
        return "none"
    return hashlib.sha256(b"channels-recovery-token\0" + token.encode("utf-8", "surrogatepass")).hexdigest()


_NOW = """
local function now_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: last-offset, room stream, dedup hash, room trim mark
# ARGV: me, start_ms, serial, event, data, window_ms, dedup_ms, now_ms|'', keep, max per room (0: no cap)
_LOG_SCRIPT = _NOW + """
local now = now_ms(ARGV[8])
local fc, fs = 'c:' .. ARGV[1], 's:' .. ARGV[1]
local st = redis.call('HMGET', KEYS[3], 'n', fc, fs)
local n = tonumber(st[1]) or 0
local c = tonumber(st[2])
if c and st[3] == ARGV[3] then
  -- the client retried a call whose reply was lost
  local again = redis.call('HGET', KEYS[3], 'o:' .. c)
  if again then return again end
end
if not c then
  -- first sighting by this instance: occurrences logged before it listened are not its own
  c = n
  local start = tonumber(ARGV[2])
  while c > 0 do
    local t = tonumber(redis.call('HGET', KEYS[3], 't:' .. c))
    if not t or t < start then break end
    c = c - 1
  end
end
c = c + 1
if c <= n then
  local off = redis.call('HGET', KEYS[3], 'o:' .. c)
  if off then
    redis.call('HSET', KEYS[3], fc, c, fs, ARGV[3])
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
    return off
  end
  c = n + 1
end
local ms, seq = 0, 0
local last = redis.call('GET', KEYS[1])
if last then
  local dash = string.find(last, '-', 1, true)
  ms = tonumber(string.sub(last, 1, dash - 1))
  seq = tonumber(string.sub(last, dash + 1))
end
if now > ms then ms = now; seq = 0 else seq = seq + 1 end
local id = string.format('%d-%d', ms, seq)
local window = tonumber(ARGV[6])
local minid = now - window
if minid < 0 then minid = 0 end
redis.call('XADD', KEYS[2], 'MINID', '~', string.format('%d', minid), id, 'e', ARGV[4], 'd', ARGV[5])
local cap = tonumber(ARGV[10] or '0')
if cap > 0 and redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', cap) > 0 then
  -- entries before the first one kept may have been missed by someone
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1][1]
  redis.call('SET', KEYS[4], first, 'PX', window)
end
redis.call('PEXPIRE', KEYS[2], window)
redis.call('SET', KEYS[1], id)
redis.call('HSET', KEYS[3], 'n', c, 'o:' .. c, id, 't:' .. c, string.format('%d', now), fc, c, fs, ARGV[3])
local keep = tonumber(ARGV[9])
if c > keep then redis.call('HDEL', KEYS[3], 'o:' .. (c - keep), 't:' .. (c - keep)) end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
return id
"""

# KEYS: session, last-offset   ARGV: sid, rooms json, token fingerprint, window_ms
_CREATE_SCRIPT = """
local off = redis.call('GET', KEYS[2]) or '0-0'
redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'rooms', ARGV[2], 'tok', ARGV[3], 'off', off)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return off
"""

# KEYS: session, last-offset, the token's current-user key   ARGV: sid, token fingerprint, window_ms
# The token lookup and the session in one round trip; the session keeps the
# user record, its rooms are worked out from it (in Python) if it is restored.
_OPEN_SCRIPT = """
local user = redis.call('GET', KEYS[3])
local off = redis.call('GET', KEYS[2]) or '0-0'
redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'user', user or '', 'tok', ARGV[2], 'off', off)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {off, user}
"""

# KEYS: session, last-offset
# ARGV: token fingerprint, offset|'', window_ms, max entries, room key prefix, trim mark prefix,
#       rooms json|'' (for a session that kept its user record instead)
# Returns a status string, {'rooms', user record} when the caller must work
# out the rooms (and call again with them), or {sid, rooms json, id, event,
# data, id, event, data, ...} with each room's entries in id order, rooms one
# after the other.
_RESTORE_SCRIPT = """
local s = redis.call('HMGET', KEYS[1], 'sid', 'rooms', 'tok', 'off', 'user')
if not s[1] then return 'unknown' end
if s[3] ~= ARGV[1] then return 'token' end
local rooms_json = s[2]
if not rooms_json then
  if (ARGV[7] or '') == '' then return {'rooms', s[5] or ''} end
  rooms_json = ARGV[7]
end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local off = s[4]
if ARGV[2] ~= '' then
  local last = redis.call('GET', KEYS[2]) or '0-0'
  if less(last, ARGV[2]) then return 'ahead' end
  -- nothing from before the session existed belongs to it
  if less(off, ARGV[2]) then off = ARGV[2] end
end
local max = tonumber(ARGV[4])
local out = {s[1], rooms_json}
local total = 0
local rooms = cjson.decode(rooms_json)
for _, room in ipairs(rooms) do
  -- the per-room cap removed entries up to the mark: one after the offset
  -- may be among them, and a replay with a hole is no recovery
  local mark = redis.call('GET', ARGV[6] .. room)
  if mark and less(off, mark) then return 'trimmed' end
end
for _, room in ipairs(rooms) do
  local entries = redis.call('XRANGE', ARGV[5] .. room, '(' .. off, '+', 'COUNT', max + 1 - total)
  total = total + #entries
  if total > max then return 'too_many' end
  for _, e in ipairs(entries) do
    local f = e[2]
    out[#out + 1] = e[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[4]
  end
  out[#out + 1] = ''
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return out
"""


class _Script:
    """EVALSHA with a reload when Redis has lost its script cache (restart,
    SCRIPT FLUSH). redis-py's pipeline script support would check for the
    script on every pipeline, an extra round trip per batch."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, redis) -> None:
        self.sha = (await redis.script_load(self.source))
        if isinstance(self.sha, bytes):
            self.sha = self.sha.decode()

    async def __call__(self, redis, keys: list, args: list):
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


class _LogLine:
    """The log calls' own connection, written and read by hand.

    redis-py's command path costs about 200 µs of CPU per call (measured,
    one EVALSHA at a time) and there is one call per relayed message, the
    largest per-message cost of the service. The connection still comes
    from the pool, so redis-py sets it up (address, TLS, AUTH, database,
    protocol); afterwards it is a RespConnection that carries nothing but
    log calls, one call or pipelined batch at a time (the store sees to
    that), whose replies are bulk strings or errors. `start` sends and
    answers through a callback, so that a relayed message needs no task;
    `run` is the same as a coroutine. Any failure drops the connection: the
    next call starts on a fresh one."""

    def __init__(self, redis, timeout: float | None):
        self._pool = redis.connection_pool
        self._timeout = timeout
        self._conn = None
        self._link: RespConnection | None = None
        self._expected = 0
        self._replies: list = []
        self._on_done: Callable[[list | None, BaseException | None], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dropping: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        """Connected, with no exchange in flight: `start` may be called."""
        return self._link is not None and not self._link.is_closed and self._on_done is None

    def start(
        self,
        commands: list[bytes],
        timeout: float | None,
        on_done: Callable[[list | None, BaseException | None], None],
    ) -> None:
        """Send `commands` (only when `ready`); `on_done(replies, None)` or
        `on_done(None, error)` follows, exactly once."""
        self._expected = len(commands)
        self._replies = []
        self._on_done = on_done
        try:
            self._link.write(b"".join(commands))
        except RedisConnectionError as exc:
            self._finish(None, exc)
            return
        limit = self._timeout if timeout is None else timeout
        if limit is not None:
            self._timer = asyncio.get_running_loop().call_later(limit, self._expire)

    async def run(self, commands: list[bytes], timeout: float | None = None) -> list:
        """Replies to `commands`, in order; raises a redis error if the
        connection fails or Redis does not answer within `timeout` (the
        line's default if None)."""
        if self._link is None or self._link.is_closed:
            # A connection that died while idle goes back to the pool first.
            await self._drop()
            try:
                await self._open()
            except BaseException as exc:  # noqa: BLE001 - failed or cancelled: the connection goes back to the pool
                await self._drop()
                raise _as_redis_error(exc) from None
        future = asyncio.get_running_loop().create_future()
        self.start(commands, timeout, _settles(future))
        try:
            return await future
        except asyncio.CancelledError:
            # Abandoned mid-exchange: the connection is out of step.
            self._finish(None, RedisTimeoutError("recovery log: call abandoned"))
            raise

    def _finish(self, replies: list | None, error: BaseException | None) -> None:
        on_done, self._on_done = self._on_done, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if error is None:
            try:
                replies = self._check(replies)
            except ProtocolError as exc:
                error = exc
        if error is not None:
            error = _as_redis_error(error)
            # A reply may be half read: this connection is out of step. It
            # is detached now, so that the next call opens a fresh one.
            link, conn, self._link, self._conn = self._link, self._conn, None, None
            if link is not None:
                link.abort(error)
            task = asyncio.get_running_loop().create_task(self._release(link, conn))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)
        if on_done is not None:
            on_done(None if error is not None else replies, error)

    def _expire(self) -> None:
        self._timer = None
        if self._on_done is not None:
            self._finish(None, TimeoutError())

    async def _open(self) -> RespConnection:
        conn = self._conn = await self._pool.get_connection()
        self._link = await RespConnection.open(conn, self._on_replies)
        self._link.closed.add_done_callback(self._on_closed)
        return self._link

    async def _drop(self) -> None:
        link, conn, self._link, self._conn = self._link, self._conn, None, None
        await self._release(link, conn)

    async def _release(self, link: RespConnection | None, conn) -> None:
        if conn is None:
            return
        try:
            if link is not None:
                await link.aclose()
            else:
                await conn.disconnect(nowait=True)
        finally:
            await self._pool.release(conn)

    def _on_closed(self, closed: asyncio.Future) -> None:
        if self._on_done is not None and self._link is not None and self._link.closed is closed:
            self._finish(None, EOFError("redis closed the recovery log connection"))

    def _on_replies(self, replies: list) -> None:
        if self._on_done is None:
            # Nobody asked: the connection is out of step.
            if self._link is not None:
                self._link.abort(ProtocolError("recovery log: reply without a call"))
            return
        self._replies += replies
        if len(self._replies) >= self._expected:
            self._finish(self._replies, None)

    def _check(self, replies: list) -> list:
        if len(replies) != self._expected:
            raise ProtocolError("recovery log: more replies than calls")
        for i, reply in enumerate(replies):
            if isinstance(reply, ReplyError):
                message = str(reply)
                replies[i] = NoScriptError(message) if reply.code == "NOSCRIPT" else ResponseError(message)
            elif not isinstance(reply, bytes):
                raise ProtocolError("recovery log: unexpected reply from redis")
        return replies


def _settles(future: asyncio.Future) -> Callable[[object, BaseException | None], None]:
    """An (outcome, error) callback that settles `future`, once."""

    def done(outcome, error):
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outcome)

    return done


def _as_redis_error(exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisTimeoutError):
        return RedisTimeoutError("recovery log: no reply from redis")
    if isinstance(exc, (EOFError, ProtocolError)) or (
        isinstance(exc, OSError) and not isinstance(exc, (RedisConnectionError, RedisTimeoutError))
    ):
        return RedisConnectionError(f"recovery log: {type(exc).__name__}")
    return exc


class _Queued:
    """Log calls waiting for the exchange in flight, and who to tell."""

    __slots__ = ("calls", "on_done", "timer")

    def __init__(self, calls: list, on_done: Callable[[list | None, BaseException | None], None]):
        self.calls = calls
        self.on_done = on_done
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, results: list | None, error: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(results, error)

    def expire(self) -> None:
        self.timer = None
        self.answer(None, RedisTimeoutError("recovery log timed out"))


class RecoveryStore:
    """Sessions and per-room event logs for Socket.IO connection state recovery.

    `instance_id` must differ between processes running at the same time
    (e.g. hostname + process id); restarts are told apart by start time.
    `clock` (milliseconds) replaces the Redis clock in ids and trimming, for
    tests only: session expiry always follows Redis's own clock.
    """

    def __init__(
        self,
        redis,
        *,
        window_seconds: int,
        instance_id: str,
        prefix: str = "recovery:",
        dedup_seconds: float = 10.0,
        max_replay: int = 10_000,
        max_events_per_room: int = 1000,
        log_timeout_seconds: float | None = 2.0,
        max_pending: int = 10_000,
        clock: Callable[[], int] | None = None,
    ):
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._redis = redis
        self.window_ms = int(window_seconds * 1000)
        self.instance_id = instance_id
        self.prefix = prefix
        self.dedup_ms = max(1, int(dedup_seconds * 1000))
        self.max_replay = max_replay
        self.max_events_per_room = max_events_per_room
        self.log_timeout = log_timeout_seconds
        self.max_pending = max_pending
        self._clock = clock
        self._last_key = prefix + "last"
        self._room_prefix = prefix + "room:"
        self._trim_prefix = prefix + "trim:"
        self._log = _Script(_LOG_SCRIPT)
        self._line = _LogLine(redis, _LOG_LINE_TIMEOUT)
        self._create = _Script(_CREATE_SCRIPT)
        self._open = _Script(_OPEN_SCRIPT)
        self._restore = _Script(_RESTORE_SCRIPT)
        # The local wall clock until mark_live() reads Redis's; the grace
        # absorbs skew between the two.
        self._start_ms = self._now_local() - _START_GRACE_MS
        self._serial = 0
        self._pending: list[_Queued] = []  # in call order
        self._pending_calls = 0
        self._flusher: asyncio.Task | None = None
        self._busy = False  # a log call or batch is in flight
        self._current = ZERO_OFFSET
        self._current_key = (0, 0)

    def _now_local(self) -> int:
        return int(self._clock()) if self._clock else int(time.time() * 1000)

    def _me(self) -> str:
        return f"{self.instance_id}:{self._start_ms}"

    def room_key(self, room: str) -> str:
        return self._room_prefix + room

    def session_key(self, pid: str) -> str:
        return self.prefix + "session:" + hashlib.sha256(pid.encode()).hexdigest()

    def dedup_key(self, room: str, event: str, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(room.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(event.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(data)
        return self.prefix + "dedup:" + h.hexdigest()

    # -- the log ---------------------------------------------------------

    async def mark_live(self) -> None:
        """Call when the pub/sub subscription (re)becomes live: messages
        published while it was down were not seen, so this instance starts a
        fresh occurrence count from now (Redis clock)."""
        if self._clock:
            now = self._now_local()
        else:
            seconds, micros = await self._redis.time()
            now = int(seconds) * 1000 + int(micros) // 1000
        self._start_ms = now - _START_GRACE_MS

    @property
    def current_offset(self) -> str:
        """The newest offset this instance has logged or been given (no I/O)."""
        return self._current

    async def high_water(self) -> str:
        """Offset of the newest logged message in any room, or the zero offset."""
        value = await self._redis.get(self._last_key)
        if value is None:
            return ZERO_OFFSET
        return value.decode() if isinstance(value, bytes) else str(value)

    async def log_message(self, room: str, event: str, data: bytes) -> str:
        """Log one relayed message (every instance calls this for every
        message) and return its offset, the same on every instance. Raises a
        redis error when Redis cannot answer in time: emit without an offset."""
        (result,) = await self.log_messages([(room, event, data)])
        if isinstance(result, BaseException):
            raise result
        return result

    async def log_messages(self, messages: list[tuple[str, str, bytes]]) -> list[str | Exception]:
        """log_message for several messages, in order, in one round trip:
        each result is the message's offset or the Redis error of its call.
        Raises a redis error (for all of them) when Redis cannot answer in time."""
        future = asyncio.get_running_loop().create_future()
        self.log_batch(messages, _settles(future))
        return await future

    def log_batch(
        self,
        messages: list[tuple[str, str, bytes]],
        on_done: Callable[[list | None, BaseException | None], None],
    ) -> None:
        """log_messages with a callback, for the relay's hot path (no task
        per batch): `on_done(results, None)` with an offset or a Redis error
        per message, or `on_done(None, error)` when Redis cannot answer within
        the log timeout. Called exactly once, possibly before this returns."""
        if self._pending_calls + len(messages) > self.max_pending:
            on_done(None, RedisTimeoutError("recovery log backlog is full"))
            return
        calls = []
        for room, event, data in messages:
            self._serial += 1
            keys = [self._last_key, self.room_key(room), self.dedup_key(room, event, data), self._trim_prefix + room]
            args = [
                self._me(), self._start_ms, self._serial, event, data, self.window_ms, self.dedup_ms,
                "" if self._clock is None else self._now_local(), 64, self.max_events_per_room,
            ]
            calls.append((keys, args))
        if not self._busy and not self._pending and self._line.ready:
            # Nothing in flight and a connection at hand: one exchange,
            # answered in the connection's read callback.
            self._busy = True
            self._line.start(
                self._packed(calls), self.log_timeout, lambda replies, error: self._direct_done(calls, on_done, replies, error)
            )
            return
        self._queue(_Queued(calls, on_done))

    def _direct_done(self, calls, on_done, replies, error) -> None:
        self._busy = False
        if error is None and any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its scripts (restart, SCRIPT FLUSH): the flusher
            # loads them and sends these calls again, ahead of the rest.
            self._queue(_Queued(calls, on_done), first=True)
            return
        if self._pending:
            self._start_flusher()
        if error is not None:
            on_done(None, error)
        else:
            on_done(self._results(replies), None)

    def _queue(self, entry: _Queued, first: bool = False) -> None:
        # Queued in call order, sent in that order after the exchange in
        # flight: offsets follow call order. The caller hears back within
        # the log timeout even if the calls are still queued; they are
        # still sent, so that every instance's occurrence count stays
        # aligned with the others'.
        if first:
            self._pending.insert(0, entry)
        else:
            self._pending.append(entry)
        self._pending_calls += len(entry.calls)
        if self.log_timeout is not None:
            entry.timer = asyncio.get_running_loop().call_later(self.log_timeout, entry.expire)
        if not self._busy:
            self._start_flusher()

    def _results(self, replies: list) -> list[str | Exception]:
        return [reply if isinstance(reply, BaseException) else self._noted(reply) for reply in replies]

    def _noted(self, reply) -> str:
        offset = reply.decode() if isinstance(reply, bytes) else str(reply)
        key = offset_key(offset)
        if key > self._current_key:
            self._current, self._current_key = offset, key
        return offset

    def _start_flusher(self) -> None:
        self._busy = True
        self._flusher = asyncio.create_task(self._flush(), name="recovery-log-flush")

    async def _flush(self) -> None:
        try:
            while self._pending:
                # Whole callers' batches, up to _MAX_BATCH calls (at least one batch).
                taken, calls = 0, []
                while taken < len(self._pending) and (
                    not calls or len(calls) + len(self._pending[taken].calls) <= _MAX_BATCH
                ):
                    calls += self._pending[taken].calls
                    taken += 1
                entries, self._pending = self._pending[:taken], self._pending[taken:]
                self._pending_calls -= len(calls)
                try:
                    results, error = await self._send(calls), None
                except Exception as exc:  # noqa: BLE001 - Redis down or worse: every waiter must hear of it
                    results, error = None, exc
                start = 0
                for entry in entries:
                    end = start + len(entry.calls)
                    if error is not None:
                        entry.answer(None, error)
                    else:
                        entry.answer(self._results(results[start:end]), None)
                    start = end
        finally:
            self._busy = False

    async def _send(self, calls: list[tuple[list, list]], timeout: float | None = None) -> list:
        """Replies (or errors) of log calls, in order. `timeout` bounds each
        round trip (the line's own if None)."""
        results = await self._line.run(self._packed(calls), timeout)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis lost its scripts (restart, SCRIPT FLUSH); the calls that
            # did run are not run twice (the serial in ARGV makes them idempotent).
            await self._log.load(self._redis)
            results = await self._line.run(self._packed(calls), timeout)
        return results

    def _packed(self, calls: list[tuple[list, list]]) -> list[bytes]:
        sha = self._log.sha
        return [pack_command("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]

    # -- sessions --------------------------------------------------------

    async def create_session(self, sid: str, token: str | None, rooms: list[str]) -> tuple[str, str]:
        """A new secret pid for a connected socket, and the offset at connect
        time (a client that gets no event before dropping recovers from it)."""
        pid = secrets.token_urlsafe(24)
        unique_rooms = list(dict.fromkeys(rooms))
        offset = await self._create(
            self._redis,
            [self.session_key(pid), self._last_key],
            [sid, json.dumps(unique_rooms), token_fingerprint(token), self.window_ms],
        )
        offset = offset.decode() if isinstance(offset, bytes) else str(offset)
        return pid, offset

    async def open_session(self, sid: str, token: str) -> tuple[str, str, bytes | None]:
        """At connect, in one round trip: the record Rails stored for
        `token` (None when there is none) and a new session (secret pid,
        connect offset) whose rooms follow from that record."""
        pid = secrets.token_urlsafe(24)
        offset, user = await self._open(
            self._redis,
            [self.session_key(pid), self._last_key, current_user_key(token)],
            [sid, token_fingerprint(token), self.window_ms],
        )
        offset = offset.decode() if isinstance(offset, bytes) else str(offset)
        return pid, offset, user

    async def touch(self, pids: list[str]) -> None:
        """Restart the window of live (or just disconnected) sessions."""
        for start in range(0, len(pids), 1000):
            pipe = self._redis.pipeline(transaction=False)
            for pid in pids[start:start + 1000]:
                pipe.pexpire(self.session_key(pid), self.window_ms)
            await pipe.execute()

    async def forget(self, pid: str) -> None:
        """The client disconnected on purpose: its session cannot be restored."""
        if isinstance(pid, str):
            await self._redis.delete(self.session_key(pid))

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
        keys = [self.session_key(pid), self._last_key]
        args = [token_fingerprint(token), offset or "", self.window_ms, self.max_replay, self._room_prefix,
                self._trim_prefix]
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
        rooms = json.loads(reply[1])
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
