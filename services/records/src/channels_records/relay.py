"""Redis pub/sub messages -> validated broadcasts. Bad input is decided on
here: the caller logs the reason and drops the message."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter, deque
from dataclasses import dataclass

from channels_common import jsonin
from channels_common.tasks import spawn

from .protocol import encode_event
from .recovery.offsets import offset_key
from .rooms import NOTICE_ROOM

log = logging.getLogger("channels.records.relay")

RECORDS_CHANNEL = "/records"
NOTICE_CHANNEL = "/system_notice"
RECORDS_EVENT = "records"
NOTICE_EVENT = "notice"

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_ROOM_LENGTH = 200
# A catch-up after a resubscription: events it replays at most, and the
# attempts at reading them before the rooms' sockets are disconnected.
CATCH_UP_MAX_EVENTS = 10_000
CATCH_UP_ATTEMPTS = 6
# Events broadcast without an offset (the log failed) remembered for the
# catch-up's skipping, at most.
MAX_UNLOGGED = 10_000


@dataclass(frozen=True, slots=True)
class Broadcast:
    room: str
    event: str
    payload: str  # the message's JSON text, exactly as Rails published it


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str


# The relay's reasons: the size and encoding as jsonin names them, any
# other refusal (syntax, nesting, NaN) as not_json.
_REASONS = {jsonin.TOO_LARGE: "too_large", jsonin.NOT_UTF8: "not_utf8"}


def _decode(data: bytes) -> tuple[str, object] | Dropped:
    try:
        text, value = jsonin.loads_with_text(data, max_bytes=MAX_MESSAGE_BYTES)
    except jsonin.JSONInputError as exc:
        return Dropped(_REASONS.get(exc.reason, "not_json"))
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
    """A validated message waiting for its recovery offset."""

    __slots__ = ("broadcast", "done", "offset")

    def __init__(self, broadcast: Broadcast):
        self.broadcast = broadcast
        self.offset: str | None = None
        self.done = False


def _digest(room: str, event: str, payload: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (room, event, payload):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()


class _CatchUp:
    """A place in the broadcast order, after everything the previous
    subscription handed over: nothing behind it goes out before the
    events missed meanwhile (see Relay.resubscribed)."""

    __slots__ = ("done", "started")

    def __init__(self) -> None:
        self.done = False
        self.started = False


class Relay:
    """The subscription handler: validate, give each message its recovery
    offset, broadcast. Called with the messages of one pub/sub read at a
    time, in publish order.

    Logging messages for recovery is a Redis round trip per batch. Several
    are in flight at once (the store sends concurrent calls in one pipeline,
    in call order), and broadcasts still go out strictly in publish order: a
    message waits for the ones before it, never the other way round."""

    def __init__(
        self, broadcaster, metrics, store=None, *, max_in_flight: int = 1000, epoch_channel=None,
        rooms=list, on_lost=lambda room: None,
    ):
        self.broadcaster = broadcaster
        # For a catch-up after a resubscription: the rooms with sockets
        # here, and what to do with a room whose missed events cannot all
        # be given (disconnect its sockets: their clients recover).
        self.rooms = rooms
        self.on_lost = on_lost
        # Offsets a catch-up broadcast, and the newest of them: their live
        # copies (same offsets: dedup) are not broadcast again.
        self._caught: set[str] = set()
        self._caught_top: tuple[int, int] | None = None
        # Digests of (room, event, payload) broadcast without an offset
        # since the last one with: a catch-up does not send them a second
        # time. Digests, not payloads: bounded memory while Redis is down.
        self._unlogged: Counter = Counter()
        self.metrics = metrics
        self.store = store
        # Markers on this channel start a new subscription epoch for the
        # recovery log's dedup (see EventLog.set_epoch); never broadcast.
        self.epoch_channel = epoch_channel
        self.max_in_flight = max_in_flight
        self._in_flight: deque[_Pending] = deque()
        self._room = asyncio.Event()  # set while there is room for more in flight
        self._room.set()
        # Offset of the newest event this instance has broadcast. Set in the
        # same step as the broadcast, so a recovery running meanwhile can
        # tell which logged events this instance has yet to send live.
        self.last_offset: str | None = None
        # Broadcasts so far: whether any went out while a recovery was
        # reading the log, whatever offsets they carried.
        self.emitted = 0

    async def handle(self, message) -> None:
        pending = self.handle_batch([message])
        if pending is not None:
            await pending

    def handle_batch(self, messages):
        """Messages that arrived together, in publish order: logged for
        recovery in one Redis round trip, then broadcast in that order.
        Returns None, or an awaitable while too many are in flight (the
        subscription holds what it reads next until it is done)."""
        batch = []
        for message in messages:
            if message.channel == self.epoch_channel and self.epoch_channel is not None:
                # What came before the marker is logged in the old epoch.
                if batch:
                    self._log(batch)
                    batch = []
                self._new_epoch(message.data)
                continue
            result = parse_message(message.channel, message.data)
            if isinstance(result, Dropped):
                log.warning(
                    "message dropped",
                    extra={"channel": message.channel, "size": len(message.data), "reason": result.reason},
                )
                self.metrics.dropped.labels(result.reason).inc()
            else:
                batch.append(_Pending(result))
        if batch:
            self._log(batch)
        if len(self._in_flight) >= self.max_in_flight:
            # Redis is slow: hold the feed until it catches up, so that
            # memory stays bounded (the subscription stops reading past its
            # limit, and Redis buffers the rest meanwhile).
            self._room.clear()
            return self._room.wait()
        return None

    def _log(self, batch: list[_Pending]) -> None:
        """Log validated messages for recovery (one round trip), then
        broadcast them in order behind those still in flight."""
        if self.store is None:
            if not self._in_flight:
                for pending in batch:
                    self._emit(pending.broadcast, None)
                return
            for pending in batch:
                pending.done = True
            self._in_flight.extend(batch)
            self._drain()
            return
        self._in_flight.extend(batch)
        messages = [(p.broadcast.room, p.broadcast.event, p.broadcast.payload.encode("utf-8")) for p in batch]
        try:
            # The store answers within its log timeout, maybe at once.
            self.store.log_batch(messages, lambda results, error: self._settle(batch, results, error))
        except Exception as exc:
            log.exception("logging messages for recovery failed")
            self._settle(batch, None, exc)

    def _new_epoch(self, data: bytes) -> None:
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        epoch = int(text) if text.isdigit() and len(text) <= 18 else None
        if epoch is None:
            # Not a marker of ours: dedup falls back to its start time.
            log.warning("malformed recovery epoch marker", extra={"size": len(data)})
        if self.store is not None:
            self.store.set_epoch(epoch)

    def _settle(self, batch: list[_Pending], results: list | None, error: BaseException | None) -> None:
        if batch[0].done:
            return  # already settled (a store answering twice would be a bug)
        if error is not None:
            # Live delivery never waits on the log longer than the store's
            # timeout: sent without an offset, the events cannot be replayed.
            log.warning("message not logged for recovery", extra={"error": type(error).__name__})
            for pending in batch:
                pending.done = True
        else:
            failed = None
            for pending, result in zip(batch, results):
                if isinstance(result, str):
                    pending.offset = result
                else:
                    failed = result
                pending.done = True
            if failed is not None:
                log.warning("message not logged for recovery", extra={"error": type(failed).__name__})
        self._drain()

    def _drain(self) -> None:
        queue = self._in_flight
        while queue and queue[0].done:
            pending = queue.popleft()
            if type(pending) is _CatchUp:
                continue
            try:
                self._emit(pending.broadcast, pending.offset)
            except Exception:
                log.exception("broadcast failed", extra={"room": pending.broadcast.room})
        if queue and type(queue[0]) is _CatchUp and not queue[0].started:
            queue[0].started = True
            spawn(self._catch_up(queue[0]), name="records-catch-up")
        if len(queue) < self.max_in_flight:
            self._room.set()

    def _emit(self, result: Broadcast, offset: str | None) -> None:
        if offset is None:
            if len(self._unlogged) < MAX_UNLOGGED:
                self._unlogged[_digest(result.room, result.event, result.payload)] += 1
        elif self._caught:
            if offset in self._caught:
                return  # the catch-up broadcast it already
            if offset_key(offset) > self._caught_top:
                self._caught.clear()  # past the catch-up: offsets come in order
                self.broadcaster.unordered = False
        self.broadcaster.to_room(result.room, encode_event(result.event, result.payload, offset), offset)
        if offset is not None:
            self.last_offset = offset
            self._unlogged.clear()
        self.emitted += 1
        self.metrics.hot.relayed_one(result.event)

    # -- after a resubscription ----------------------------------------------

    def resubscribed(self) -> None:
        """The subscription is live again after a drop: what other
        instances logged meanwhile never reached this one. Called before
        the new subscription hands anything over: its messages are logged
        as usual but broadcast only after the catch-up (`_catch_up`)."""
        if self.store is None or self.last_offset is None:
            return  # nothing relayed yet: no place to catch up from
        self._in_flight.append(_CatchUp())
        self._drain()

    async def _catch_up(self, mark: _CatchUp) -> None:
        """Broadcast every event logged in the rooms with sockets here after
        the last offset this instance broadcast, in offset order, each
        once; disconnect the sockets of a room for which that cannot be
        done (trimmed, too many, Redis not answering): a gap is never silent."""
        try:
            since = self.last_offset
            rooms = list(self.rooms())
            events, lost = [], rooms
            for attempt in range(CATCH_UP_ATTEMPTS):
                try:
                    events, lost = await asyncio.wait_for(
                        self.store.read_since(rooms, since, CATCH_UP_MAX_EVENTS), 5.0
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - Redis down or worse: the rooms' sockets are told
                    log.warning(
                        "catch-up after resubscribing: log read failed",
                        extra={"error": type(exc).__name__, "attempt": attempt + 1},
                    )
                    await asyncio.sleep(min(1.0, 0.2 * 2 ** attempt) * (0.5 + random.random() / 2))
            for room in lost:
                self.on_lost(room)
            unlogged = self._unlogged
            # Live copies of older events in rooms the read did not cover
            # (joined since) may follow these: recovery floors must hold.
            self.broadcaster.unordered = bool(events)
            for room, event in events:
                payload = event.data.decode("utf-8", "replace")
                if unlogged:
                    digest = _digest(room, event.event, payload)
                    if unlogged[digest] > 0:
                        unlogged[digest] -= 1
                        continue  # broadcast already, without its offset
                self.broadcaster.to_room(room, encode_event(event.event, payload, event.offset), event.offset)
                self._caught.add(event.offset)
                self.last_offset = event.offset
                self.emitted += 1
            if self._caught:
                self._caught_top = max(offset_key(o) for o in self._caught)
            else:
                self.broadcaster.unordered = False
            if events or lost:
                log.info(
                    "caught up after resubscribing",
                    extra={"events": len(events), "rooms": len(rooms), "lost_rooms": len(lost)},
                )
        except Exception:
            log.exception("catch-up after resubscribing failed")
        finally:
            mark.done = True
            self._drain()
