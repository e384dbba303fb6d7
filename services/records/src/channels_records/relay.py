"""Redis pub/sub messages -> validated broadcasts. Bad input is decided on
here: the caller logs the reason and drops the message."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass

from redis.exceptions import RedisError

from .protocol import encode_event
from .rooms import NOTICE_ROOM

log = logging.getLogger("channels.records.relay")

RECORDS_CHANNEL = "/records"
NOTICE_CHANNEL = "/system_notice"
RECORDS_EVENT = "records"
NOTICE_EVENT = "notice"

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_ROOM_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Broadcast:
    room: str
    event: str
    payload: str  # the message's JSON text, exactly as Rails published it


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str


def _reject_constant(name: str):
    # NaN and Infinity are Python extensions; JSON.parse in the browser
    # rejects them, which would break the whole packet on the client.
    raise ValueError(f"non-standard JSON constant {name}")


def _decode(data: bytes) -> tuple[str, object] | Dropped:
    if len(data) > MAX_MESSAGE_BYTES:
        return Dropped("too_large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Dropped("not_utf8")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return Dropped("not_json")
    return text.strip(), value


def parse_message(channel: str, data: bytes) -> Broadcast | Dropped:
    if channel not in (RECORDS_CHANNEL, NOTICE_CHANNEL):
        return Dropped("unknown_channel")
    decoded = _decode(data)
    if isinstance(decoded, Dropped):
        return decoded
    text, value = decoded
    if channel == NOTICE_CHANNEL:
        return Broadcast(room=NOTICE_ROOM, event=NOTICE_EVENT, payload=text)
    if not isinstance(value, dict):
        return Dropped("not_object")
    room = value.get("room")
    if not isinstance(room, str) or not room:
        return Dropped("no_room")
    if len(room) > MAX_ROOM_LENGTH or not room.isprintable():
        return Dropped("bad_room")
    return Broadcast(room=room, event=RECORDS_EVENT, payload=text)


class _Pending:
    """A validated message waiting for its recovery offset; the task that
    logs it is kept here so that it is not garbage collected mid-flight."""

    __slots__ = ("broadcast", "done", "offset", "task")

    def __init__(self, broadcast: Broadcast):
        self.broadcast = broadcast
        self.offset: str | None = None
        self.done = False
        self.task: asyncio.Task | None = None


class Relay:
    """The subscription handler: validate, give the message its recovery
    offset, broadcast. Called for one message at a time, in publish order.

    Logging a message for recovery is a Redis round trip. Several are in
    flight at once (the store sends concurrent calls in one pipeline, in
    call order), and broadcasts still go out strictly in publish order: a
    message waits for the ones before it, never the other way round."""

    def __init__(self, broadcaster, metrics, store=None, *, max_in_flight: int = 1000):
        self.broadcaster = broadcaster
        self.metrics = metrics
        self.store = store
        self.max_in_flight = max_in_flight
        self._in_flight: deque[_Pending] = deque()
        self._room = asyncio.Event()  # set while there is room for more in flight
        self._room.set()
        # Offset of the newest event this instance has broadcast. Set in the
        # same step as the broadcast, so a recovery running meanwhile can
        # tell which logged events this instance has yet to send live.
        self.last_offset: str | None = None

    async def handle(self, message) -> None:
        result = parse_message(message.channel, message.data)
        if isinstance(result, Dropped):
            log.warning(
                "message dropped",
                extra={"channel": message.channel, "size": len(message.data), "reason": result.reason},
            )
            self.metrics.dropped.labels(result.reason).inc()
            return
        if self.store is None and not self._in_flight:
            self._emit(result, None)
            return
        pending = _Pending(result)
        self._in_flight.append(pending)
        if self.store is None:
            pending.done = True
            self._drain()
            return
        pending.task = asyncio.get_running_loop().create_task(self._log(pending))
        if len(self._in_flight) >= self.max_in_flight:
            # Redis is slow: stop reading pub/sub until it catches up, so
            # that memory stays bounded (Redis buffers the rest meanwhile).
            self._room.clear()
            await self._room.wait()

    async def _log(self, pending: _Pending) -> None:
        b = pending.broadcast
        try:
            # The store bounds the wait itself (and raises a Redis error).
            pending.offset = await self.store.log_message(b.room, b.event, b.payload.encode("utf-8"))
        except (TimeoutError, RedisError, OSError) as exc:
            # Live delivery never waits on the log longer than that: sent
            # without an offset, the event just cannot be replayed.
            log.warning("message not logged for recovery", extra={"error": type(exc).__name__})
        except asyncio.CancelledError:
            pending.done = True
            self._drain()
            raise
        except Exception:
            log.exception("logging a message for recovery failed")
        pending.done = True
        self._drain()

    def _drain(self) -> None:
        queue = self._in_flight
        while queue and queue[0].done:
            pending = queue.popleft()
            try:
                self._emit(pending.broadcast, pending.offset)
            except Exception:
                log.exception("broadcast failed", extra={"room": pending.broadcast.room})
        if len(queue) < self.max_in_flight:
            self._room.set()

    def _emit(self, result: Broadcast, offset: str | None) -> None:
        self.broadcaster.to_room(result.room, encode_event(result.event, result.payload, offset), offset)
        if offset is not None:
            self.last_offset = offset
        self.metrics.relayed.labels(result.event).inc()
