"""The one place that opens Redis connections.

Two kinds of use:
- commands (token lookups, scripts, publishing): a bounded pool that makes
  callers wait for a free connection instead of failing, with retries on
  connection errors;
- a pub/sub subscription that survives Redis going away: it reconnects with
  backoff and jitter, subscribes again, and reports whether it is live so
  that /readyz can tell the truth.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .resp import ReplyError, ReplyReader, RespProtocolError, pack_command
from .tasks import spawn

log = logging.getLogger("channels.redis")


def create_redis(
    url: str,
    *,
    max_connections: int = 50,
    pool_timeout: float | None = 20.0,
    socket_timeout: float | None = 5.0,
) -> aioredis.Redis:
    """A client whose pool queues callers past `max_connections` (a
    BlockingConnectionPool) rather than raising "Too many connections"."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        decode_responses=False,
    )
    return aioredis.Redis(
        connection_pool=pool,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )


@dataclass(slots=True)
class Message:
    channel: str
    data: bytes
    pattern: str | None = None


Handler = Callable[[Message], Awaitable[None] | None]
BatchHandler = Callable[[list[Message]], Awaitable[None] | None]


class RespConnection(asyncio.Protocol):
    """A connection redis-py has set up (address, TLS, AUTH, database,
    protocol), taken over so that replies arrive as callbacks.

    Two paths carry a Redis exchange per relayed message: the pub/sub feed
    and the records service's recovery log. Through redis-py (or any
    StreamReader) every reply costs a future and a task step, measured here
    at about 40 µs of CPU per wake-up on top of the 55 µs the wake-up itself
    costs; here `on_replies` runs in the read callback, with every complete
    reply of the chunk. redis-py's own protocol object still hears of the
    end of the connection, so its disconnect() works as usual.
    """

    def __init__(self, conn, on_replies: Callable[[list], None], parser: ReplyReader):
        self.conn = conn
        self.on_replies = on_replies
        self.parser = parser
        self.transport = None
        self._inner = None
        self.paused = False
        # Done when the connection ends: with an exception saying why,
        # unless closed on purpose. Waiting on it is optional.
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed.add_done_callback(_mark_retrieved)

    @classmethod
    async def open(cls, conn, on_replies: Callable[[list], None], parser: ReplyReader | None = None) -> RespConnection:
        """Connect `conn` (a redis-py asyncio Connection) if needed and take it over."""
        if not conn.is_connected:
            await conn.connect()
        self = cls(conn, on_replies, parser or ReplyReader())
        # redis-py's private stream pair: after connect() nothing else reads it.
        reader, writer = conn._reader, conn._writer
        self.transport = writer.transport
        self._inner = self.transport.get_protocol()
        leftover = bytes(reader._buffer)
        reader._buffer.clear()
        self.transport.set_protocol(self)
        if leftover:
            self.data_received(leftover)
        return self

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def pause(self) -> None:
        """Stop reading (idempotent; uvloop's pause_reading is not)."""
        if not self.paused and not self.closed.done():
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.closed.done():
            self.paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.closed.done():
            raise RedisConnectionError("redis connection closed")
        self.transport.write(data)

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the connection (it is out of step, or silent)."""
        if not self.closed.done():
            self.closed.set_exception(exc or RedisConnectionError("redis connection dropped"))
        self.transport.abort()

    async def aclose(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        await self.conn.disconnect(nowait=True)

    # -- asyncio.Protocol --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except RespProtocolError as exc:
            self.abort(exc)
            return
        if replies:
            self.on_replies(replies)

    def eof_received(self):
        return None  # the transport closes itself

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            reason = f" ({_describe(exc)})" if exc is not None else ""
            self.closed.set_exception(RedisConnectionError("redis closed the connection" + reason))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


@dataclass
class Subscription:
    """A pub/sub subscription that keeps itself alive.

    `handler` is called for every message, in order, one at a time; an
    exception from it is logged and the next message is handled. With
    `batch_handler` instead, it gets every message that arrived in one read
    of the socket, in order, as one list (a busy relay then pays its
    per-call costs once per burst instead of once per message). Either is
    called from the socket's read callback; one that returns an awaitable
    holds the feed (reading pauses) until the awaitable is done.
    `on_live` is called each time the subscription (re)becomes live, so that
    a service can redo work that needed Redis during an outage. With
    `read_clock`, `subscribed_at_ms` is then the Redis clock read on the
    subscription's own connection just before its SUBSCRIBE (None if Redis
    would not tell): every message published from then on reaches this
    subscription, none published before that time does. `generation` counts
    the times it became live.

    With `epoch_channel`, the SUBSCRIBE goes in one MULTI with a script that
    increments the key of that name and publishes the new number on the
    channel of that name (subscribed too): every subscriber of it, this one
    first, gets that marker exactly where this subscription begins in the
    order of everything published (the first message handed over). Should
    Redis refuse it or leave it out, the next attempt subscribes without.

    A connection that stays silent for `idle_ping_seconds` gets a PING; one
    that stays silent after that is taken for dead and replaced.
    """

    url: str
    handler: Handler | None = None
    channels: Iterable[str] = ()
    patterns: Iterable[str] = ()
    on_live: Callable[[], Awaitable[None] | None] | None = None
    on_reconnect: Callable[[], None] | None = None
    batch_handler: BatchHandler | None = None
    max_backoff: float = 5.0
    idle_ping_seconds: float = 10.0
    read_clock: bool = False
    epoch_channel: str | None = None
    live: bool = field(default=False, init=False)
    subscribed_at_ms: int | None = field(default=None, init=False)
    generation: int = field(default=0, init=False)
    _clock_reply: asyncio.Future | None = field(default=None, init=False, repr=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _live_event: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _heard: bool = field(default=False, init=False, repr=False)
    _link: RespConnection | None = field(default=None, init=False, repr=False)
    # Until the PING reply: messages that arrived before it, and its future.
    _early: list[Message] | None = field(default=None, init=False, repr=False)
    _pong: asyncio.Future | None = field(default=None, init=False, repr=False)
    # While an awaitable from the handler runs: messages read meanwhile.
    _held: list[Message] | None = field(default=None, init=False, repr=False)
    _holder: asyncio.Task | None = field(default=None, init=False, repr=False)
    _held_bytes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self.channels = tuple(self.channels)
        self.patterns = tuple(self.patterns)

    def start(self) -> None:
        self._task = spawn(self._run(), name="redis-subscription")

    async def wait_live(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._live_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self._stopping = True
        if self._holder is not None:
            self._holder.cancel()
            self._holder = self._held = None
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001 - stopping must not fail
                log.debug("subscription task ended with an error", extra={"error": str(exc)})

    async def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stopping:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=5.0, socket_keepalive=True)
            conn = client.connection_pool.make_connection()
            watchdog = link = None
            try:
                link = self._link = await RespConnection.open(
                    conn, self._on_replies, ReplyReader(max_bulk=_MAX_MESSAGE_BYTES)
                )
                await self._subscribe(link)
                if not first and self.on_reconnect:
                    self.on_reconnect()
                log.info(
                    "redis subscription live",
                    extra={"channels": list(self.channels), "patterns": list(self.patterns)},
                )
                first = False
                attempt = 0
                self.generation += 1
                self.live = True
                self._live_event.set()
                if self.on_live:
                    result = self.on_live()
                    if asyncio.iscoroutine(result):
                        spawn(result, name="redis-subscription-on-live")
                watchdog = spawn(self._watch(link), name="redis-subscription-watchdog")
                early, self._early = self._early, None
                if self._holder is not None:
                    # A handler still holds the previous connection's
                    # messages: these queue behind them.
                    self._held += early
                elif early:
                    self._dispatch(early)
                await link.closed
                raise RedisConnectionError("redis subscription closed")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, EOFError, RespProtocolError, ReplyError) as exc:
                if self.live:
                    log.warning("redis subscription lost", extra={"error": _describe(exc)})
                else:
                    log.warning("redis subscription cannot connect", extra={"error": _describe(exc)})
            finally:
                self.live = False
                self._live_event.clear()
                self._link = None
                self._early = self._pong = self._clock_reply = None
                if watchdog is not None:
                    watchdog.cancel()
                # A handler still holding the feed carries on: what this
                # connection delivered was accepted and is still handled.
                try:
                    if link is not None:
                        await link.aclose()
                    else:
                        await conn.disconnect(nowait=True)
                    await client.aclose()
                except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail
                    log.debug("closing the subscription connection failed", extra={"error": str(exc)})
            if self._stopping:
                break
            attempt += 1
            delay = min(self.max_backoff, 0.1 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _subscribe(self, link: RespConnection) -> None:
        """Subscribe, then PING: its reply comes after every confirmation,
        so once it is in, the subscription is live. Messages that arrived
        before it wait in _early, to be handled once live. With read_clock,
        a TIME goes first on the same connection: Redis runs it just before
        the SUBSCRIBE, so no message published after it is missed."""
        commands = []
        if self.read_clock:
            commands.append(pack_command("TIME"))
            self._clock_reply = asyncio.get_running_loop().create_future()
        self.subscribed_at_ms = None
        if self.epoch_channel:
            commands += [
                _MULTI,
                pack_command("SUBSCRIBE", *self.channels, self.epoch_channel),
                pack_command("EVAL", _EPOCH_SCRIPT, 1, self.epoch_channel, self.epoch_channel),
                _EXEC,
            ]
        elif self.channels:
            commands.append(pack_command("SUBSCRIBE", *self.channels))
        if self.patterns:
            commands.append(pack_command("PSUBSCRIBE", *self.patterns))
        commands.append(pack_command("PING"))
        self._early = []
        self._pong = asyncio.get_running_loop().create_future()
        link.write(b"".join(commands))
        async with asyncio.timeout(_SUBSCRIBE_TIMEOUT):
            await asyncio.wait((self._pong, link.closed), return_when=asyncio.FIRST_COMPLETED)
        if link.closed.done():
            await link.closed  # raises why
            raise EOFError("redis closed the connection")
        self._pong = None
        if self.epoch_channel and not (self._early and self._early[0].channel == self.epoch_channel):
            # Published inside the EXEC, the marker comes before the PING's reply.
            log.warning("no epoch marker from redis: subscribing without one from now on")
            self.epoch_channel = None
            raise EOFError("no epoch marker")
        if self._clock_reply is not None:
            # Answered before the PING: done by now.
            reply, self._clock_reply = self._clock_reply.result() if self._clock_reply.done() else None, None
            self.subscribed_at_ms = _clock_ms(reply)

    def _on_replies(self, replies: list) -> None:
        self._heard = True
        messages = []
        clock = self._clock_reply
        if clock is not None and not clock.done() and replies:
            # The TIME sent ahead of the SUBSCRIBE answers first.
            clock.set_result(replies[0])
            replies = replies[1:]
        for reply in replies:
            try:
                message = _message(reply)
            except ReplyError as exc:
                log.warning("redis refused a subscription command", extra={"error": str(exc)})
                if self.epoch_channel and self._pong is not None and not _transient(exc):
                    log.warning("subscribing without an epoch marker from now on")
                    self.epoch_channel = None
                if self._link is not None:
                    self._link.abort(exc)
                return
            if message is not None:
                messages.append(message)
            elif self._pong is not None and _is_pong(reply) and not self._pong.done():
                self._pong.set_result(None)
        if not messages:
            return
        if self._early is not None:
            self._early += messages
        elif self._held is not None:
            self._held += messages
            self._held_bytes += sum(len(m.data) for m in messages)
            if self._held_bytes > _HOLD_LIMIT_BYTES and self._link is not None:
                self._link.pause()
        else:
            self._dispatch(messages)

    def _dispatch(self, messages: list[Message]) -> None:
        """Hand messages over, in order; an awaitable from the handler holds
        the rest (and reading) until it is done."""
        if self.batch_handler is not None:
            pending = self._call(self.batch_handler, messages, {"count": len(messages)})
            if pending is not None:
                self._hold(pending, [])
            return
        for i, message in enumerate(messages):
            pending = self._call(self.handler, message, {"channel": message.channel})
            if pending is not None:
                self._hold(pending, messages[i + 1 :])
                return

    def _call(self, fn, arg, extra: dict):
        try:
            result = fn(arg)
        except Exception:
            log.exception("handler failed for redis messages", extra=extra)
            return None
        if result is None:
            return None  # the usual answer, so checked before isawaitable
        return result if inspect.isawaitable(result) else None

    def _hold(self, pending, rest: list[Message]) -> None:
        # Reading goes on (so that a dead connection is still noticed) until
        # the held messages pass _HOLD_LIMIT_BYTES; then Redis buffers.
        self._held = rest
        self._held_bytes = sum(len(m.data) for m in rest)
        self._holder = spawn(self._release(pending), name="redis-subscription-holder")

    async def _release(self, pending) -> None:
        try:
            await pending
        except Exception:
            log.exception("handler failed for redis messages")
        held, self._held, self._holder = self._held, None, None
        link = self._link
        if held:
            self._dispatch(held)
        if self._held is None and link is not None:
            link.resume()

    async def _watch(self, link: RespConnection) -> None:
        """Ping a silent connection; drop it if the ping goes unanswered
        (a half-open TCP connection would otherwise wait forever)."""
        pinged = False
        while True:
            self._heard = False
            await asyncio.sleep(self.idle_ping_seconds)
            if self._heard or link.paused:
                pinged = False  # a paused feed is silent on purpose
            elif link.is_closed:
                return
            elif not pinged:
                link.write(_PING)
                pinged = True
            else:
                log.warning("redis subscription silent after a ping, reconnecting")
                link.abort()
                return


_SUBSCRIBE_TIMEOUT = 10.0
# Messages read while a handler holds the feed, at most (then reading pauses).
_HOLD_LIMIT_BYTES = 8 * 1024 * 1024
# The largest message a subscriber accepts; Redis itself allows 512 MB.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PING = pack_command("PING")
_MULTI = pack_command("MULTI")
_EXEC = pack_command("EXEC")
# KEYS[1]: the epoch counter; ARGV[1]: the channel its new value goes to.
_EPOCH_SCRIPT = "local n = redis.call('INCR', KEYS[1]) redis.call('PUBLISH', ARGV[1], n) return n"
_MESSAGE = b"message"
_PMESSAGE = b"pmessage"


def _message(reply) -> Message | None:
    """A pub/sub message from one reply; None for confirmations and pongs.
    An error reply (e.g. a SUBSCRIBE the ACL refuses) is raised."""
    if isinstance(reply, list) and reply:
        kind = reply[0]
        if kind == _MESSAGE and len(reply) == 3:
            return Message(channel=_text(reply[1]), data=_bytes(reply[2]))
        if kind == _PMESSAGE and len(reply) == 4:
            return Message(channel=_text(reply[2]), data=_bytes(reply[3]), pattern=_text(reply[1]))
        return None
    if isinstance(reply, ReplyError):
        raise reply
    return None


# Refusals that say "not now" (a Redis still loading its dataset, a busy
# script, a replica without its primary), not "never": the next attempt
# keeps the epoch marker. Two instances, one with markers and one without,
# would log every message twice (their dedup keys differ).
_TRANSIENT_REFUSALS = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def _transient(exc: BaseException) -> bool:
    return str(exc).lstrip("-").upper().startswith(_TRANSIENT_REFUSALS)


def _mark_retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _clock_ms(reply) -> int | None:
    """Milliseconds of a TIME reply ([seconds, microseconds]); None for anything else."""
    if isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) and x.isdigit() for x in reply):
        return int(reply[0]) * 1000 + int(reply[1]) // 1000
    return None


def _is_pong(reply) -> bool:
    # RESP2 answers a PING in subscribed mode with ["pong", ""]; RESP3 with +PONG.
    if isinstance(reply, list):
        return bool(reply) and reply[0] == b"pong"
    return reply == b"PONG"


def _bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


async def with_backoff(
    op: Callable[[], Awaitable], *, what: str, max_delay: float = 5.0, stop: asyncio.Event | None = None
):
    """Run `op` until it succeeds, retrying Redis errors with backoff."""
    attempt = 0
    while True:
        try:
            return await op()
        except (RedisError, OSError) as exc:
            attempt += 1
            if stop is not None and stop.is_set():
                raise
            delay = min(max_delay, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
            log.warning("redis operation failed, retrying", extra={"what": what, "error": str(exc), "attempt": attempt})
            await asyncio.sleep(delay)


