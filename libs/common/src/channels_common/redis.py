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


@dataclass
class Subscription:
    """A pub/sub subscription that keeps itself alive.

    `handler` is called for every message, in order, one at a time; an
    exception from it is logged and the next message is handled.
    `on_live` is called each time the subscription (re)becomes live, so that
    a service can redo work that needed Redis during an outage.
    """

    url: str
    handler: Handler
    channels: Iterable[str] = ()
    patterns: Iterable[str] = ()
    on_live: Callable[[], Awaitable[None] | None] | None = None
    on_reconnect: Callable[[], None] | None = None
    max_backoff: float = 5.0
    live: bool = field(default=False, init=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _live_event: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

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
            client = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=5.0, socket_keepalive=True
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                if self.channels:
                    await pubsub.subscribe(*self.channels)
                if self.patterns:
                    await pubsub.psubscribe(*self.patterns)
                await client.ping()
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
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.live:
                    log.warning("redis subscription lost", extra={"error": str(exc)})
                else:
                    log.warning("redis subscription cannot connect", extra={"error": str(exc)})
            finally:
                self.live = False
                self._live_event.clear()
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail
                    log.debug("closing the subscription connection failed", extra={"error": str(exc)})
            if self._stopping:
                break
            attempt += 1
            delay = min(self.max_backoff, 0.1 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _read(self, pubsub) -> None:
        while True:
            # A timeout lets a silent but dead connection be noticed by the ping.
            msg = await pubsub.get_message(timeout=10.0)
            if msg is None:
                await pubsub.ping()
                continue
            kind = msg.get("type")
            if kind not in ("message", "pmessage"):
                continue
            channel = _text(msg.get("channel"))
            pattern = _text(msg.get("pattern")) if kind == "pmessage" else None
            data = msg.get("data")
            if isinstance(data, str):
                data = data.encode()
            try:
                result = self.handler(Message(channel=channel, data=data, pattern=pattern))
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("handler failed for a redis message", extra={"channel": channel})


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


