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

from .resp import ProtocolError, ReplyError, ReplyReader, pack_command

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


@dataclass
class Subscription:
    """A pub/sub subscription that keeps itself alive.

    `handler` is called for every message, in order, one at a time; an
    exception from it is logged and the next message is handled. With
    `batch_handler` instead, it gets every message that arrived in one read
    of the socket, in order, as one list (a busy relay then pays its
    per-call costs once per burst instead of once per message).
    `on_live` is called each time the subscription (re)becomes live, so that
    a service can redo work that needed Redis during an outage.

    redis-py opens the connection (address, TLS, AUTH, database, protocol);
    after that the subscription reads the socket itself, whole chunks at a
    time, through resp.ReplyReader. A connection that stays silent for
    `idle_ping_seconds` gets a PING; one that stays silent after that is
    taken for dead and replaced.
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
    live: bool = field(default=False, init=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _live_event: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _heard: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self.channels = tuple(self.channels)
        self.patterns = tuple(self.patterns)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-subscription")

    async def wait_live(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._live_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self._stopping = True
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
            watchdog = None
            try:
                await conn.connect()
                # redis-py's private stream pair: after connect() it is a
                # plain asyncio stream that nothing else reads or writes.
                reader, writer = conn._reader, conn._writer
                parser = ReplyReader(max_bulk=_MAX_MESSAGE_BYTES)
                early = await self._subscribe(reader, writer, parser)
                if not first and self.on_reconnect:
                    self.on_reconnect()
                log.info(
                    "redis subscription live",
                    extra={"channels": list(self.channels), "patterns": list(self.patterns)},
                )
                first = False
                attempt = 0
                self.live = True
                self._live_event.set()
                if self.on_live:
                    result = self.on_live()
                    if asyncio.iscoroutine(result):
                        asyncio.create_task(result)
                watchdog = asyncio.create_task(self._watch(writer), name="redis-subscription-watchdog")
                if early:
                    await self._dispatch(early)
                await self._read(reader, parser)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, EOFError, ProtocolError, ReplyError) as exc:
                if self.live:
                    log.warning("redis subscription lost", extra={"error": _describe(exc)})
                else:
                    log.warning("redis subscription cannot connect", extra={"error": _describe(exc)})
            finally:
                self.live = False
                self._live_event.clear()
                if watchdog is not None:
                    watchdog.cancel()
                try:
                    await conn.disconnect(nowait=True)
                    await client.aclose()
                except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail
                    log.debug("closing the subscription connection failed", extra={"error": str(exc)})
            if self._stopping:
                break
            attempt += 1
            delay = min(self.max_backoff, 0.1 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _subscribe(self, reader, writer, parser: ReplyReader) -> list[Message]:
        """Subscribe, then PING: its reply comes after every confirmation,
        so once it is in, the subscription is live. Messages that arrived
        before it are returned, to be handled once live."""
        commands = []
        if self.channels:
            commands.append(pack_command("SUBSCRIBE", *self.channels))
        if self.patterns:
            commands.append(pack_command("PSUBSCRIBE", *self.patterns))
        commands.append(pack_command("PING"))
        writer.write(b"".join(commands))
        early: list[Message] = []
        async with asyncio.timeout(_SUBSCRIBE_TIMEOUT):
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise EOFError("redis closed the connection")
                for reply in parser.feed(data):
                    if _is_pong(reply):
                        return early
                    message = _message(reply)
                    if message is not None:
                        early.append(message)

    async def _read(self, reader, parser: ReplyReader) -> None:
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise EOFError("redis closed the connection")
            self._heard = True
            messages = []
            for reply in parser.feed(data):
                message = _message(reply)
                if message is not None:
                    messages.append(message)
            if messages:
                await self._dispatch(messages)

    async def _dispatch(self, messages: list[Message]) -> None:
        if self.batch_handler is not None:
            try:
                result = self.batch_handler(messages)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handler failed for redis messages", extra={"count": len(messages)})
            return
        for message in messages:
            try:
                result = self.handler(message)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handler failed for a redis message", extra={"channel": message.channel})

    async def _watch(self, writer) -> None:
        """Ping a silent connection; drop it if the ping goes unanswered
        (a half-open TCP connection would otherwise wait forever)."""
        pinged = False
        while True:
            self._heard = False
            await asyncio.sleep(self.idle_ping_seconds)
            if self._heard:
                pinged = False
            elif not pinged:
                writer.write(_PING)
                pinged = True
            else:
                log.warning("redis subscription silent after a ping, reconnecting")
                writer.transport.abort()
                return


_READ_SIZE = 256 * 1024
_SUBSCRIBE_TIMEOUT = 10.0
# The largest message a subscriber accepts; Redis itself allows 512 MB.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PING = pack_command("PING")
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


