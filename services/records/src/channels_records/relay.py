"""Redis pub/sub messages -> validated broadcasts. Bad input is decided on
here: the caller logs the reason and drops the message."""

from __future__ import annotations

import json
import logging
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


class Relay:
    """The subscription handler: validate, give the message its recovery
    offset, broadcast. Called for one message at a time, in publish order."""

    def __init__(self, broadcaster, metrics, store=None):
        self.broadcaster = broadcaster
        self.metrics = metrics
        self.store = store
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
        offset = None
        if self.store is not None:
            try:
                # The store bounds the wait itself (and raises a Redis error).
                offset = await self.store.log_message(result.room, result.event, result.payload.encode("utf-8"))
            except (TimeoutError, RedisError, OSError) as exc:
                # Live delivery never waits on the log: sent without an
                # offset, the event just cannot be replayed.
                log.warning("message not logged for recovery", extra={"error": type(exc).__name__})
        self.broadcaster.to_room(result.room, encode_event(result.event, result.payload, offset), offset)
        if offset is not None:
            self.last_offset = offset
        self.metrics.relayed.labels(result.event).inc()
