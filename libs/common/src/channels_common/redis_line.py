"""A Redis connection driven by hand (RedisLine), for the paths that make
one call per message or per connect: pipelined exchanges, replies through a
callback, no task per call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis import RespConnection
from .resp import ReplyError, RespProtocolError
from .tasks import spawn


class RedisLine:
    """A connection of its own, written and read by hand: one command or
    pipelined batch at a time (its owner sees to that), replies in order.

    redis-py's command path costs about 200 µs of CPU per call (measured,
    one EVALSHA at a time); on a per-message or per-connect path that is
    the largest cost. The connection still comes from the pool, so redis-py
    sets it up (address, TLS, AUTH, database, protocol); afterwards it is a
    RespConnection. Error replies become redis-py's exceptions (NOSCRIPT:
    NoScriptError), in place of the reply. `start` sends and answers
    through a callback, so a caller needs no task; `run` is the same as a
    coroutine. Any failure drops the connection: the next exchange starts
    on a fresh one."""

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
                raise as_redis_error(exc) from None
        future = asyncio.get_running_loop().create_future()
        self.start(commands, timeout, settles(future))
        try:
            return await future
        except asyncio.CancelledError:
            # Abandoned mid-exchange: the connection is out of step.
            self._finish(None, RedisTimeoutError("redis line: call abandoned"))
            raise

    def _finish(self, replies: list | None, error: BaseException | None) -> None:
        on_done, self._on_done = self._on_done, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if error is None:
            try:
                replies = self._check(replies)
            except RespProtocolError as exc:
                error = exc
        if error is not None:
            error = as_redis_error(error)
            # A reply may be half read: this connection is out of step. It
            # is detached now, so that the next call opens a fresh one.
            link, conn, self._link, self._conn = self._link, self._conn, None, None
            if link is not None:
                link.abort(error)
            spawn(self._release(link, conn), name="redis-line-release", tasks=self._dropping)
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

    async def aclose(self) -> None:
        """Give the connection back to the pool (closed); a later call opens another."""
        await self._drop()

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
            self._finish(None, EOFError("redis closed the connection"))

    def _on_replies(self, replies: list) -> None:
        if self._on_done is None:
            # Nobody asked: the connection is out of step.
            if self._link is not None:
                self._link.abort(RespProtocolError("redis line: reply without a call"))
            return
        self._replies += replies
        if len(self._replies) >= self._expected:
            self._finish(self._replies, None)

    def _check(self, replies: list) -> list:
        if len(replies) != self._expected:
            raise RespProtocolError("redis line: more replies than calls")
        for i, reply in enumerate(replies):
            if isinstance(reply, ReplyError):
                message = str(reply)
                replies[i] = NoScriptError(message) if reply.code == "NOSCRIPT" else ResponseError(message)
        return replies


def settles(future: asyncio.Future) -> Callable[[object, BaseException | None], None]:
    """An (outcome, error) callback that settles `future`, once."""

    def done(outcome, error):
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outcome)

    return done


def as_redis_error(exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisTimeoutError):
        return RedisTimeoutError("no reply from redis")
    if isinstance(exc, (EOFError, RespProtocolError)) or (
        isinstance(exc, OSError) and not isinstance(exc, (RedisConnectionError, RedisTimeoutError))
    ):
        return RedisConnectionError(f"redis line: {type(exc).__name__}")
    return exc


class BatchedCalls:
    """Commands on a RedisLine of their own, pipelined: calls made while an
    exchange is in flight go together in the next one (at most `max_batch`),
    in call order. A call's future gets its reply, or the error reply or
    connection failure as its exception; a call whose caller gave up
    (cancelled) is still sent, its reply dropped."""

    def __init__(self, line: RedisLine, *, max_batch: int = 500, timeout: float | None = None):
        self.line = line
        self.max_batch = max_batch
        self.timeout = timeout
        self._queue: list[tuple[bytes, asyncio.Future]] = []
        self._busy = False
        self._opening: asyncio.Task | None = None

    def call(self, command: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        if not self._busy:
            self._send_next()
        return future

    def _send_next(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
        self._busy = True
        commands = [command for command, _ in batch]
        if self.line.ready:
            self.line.start(commands, self.timeout, lambda replies, error: self._done(batch, replies, error))
        else:
            # Not connected yet (or the last connection failed): `run` opens one.
            self._opening = spawn(self._run(batch, commands), name="redis-line-open")

    async def _run(self, batch, commands) -> None:
        try:
            replies, error = await self.line.run(commands, self.timeout), None
        except Exception as exc:  # noqa: BLE001 - every caller of the batch must hear of it
            replies, error = None, exc
        self._opening = None
        self._done(batch, replies, error)

    def _done(self, batch, replies: list | None, error: BaseException | None) -> None:
        self._busy = False
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            outcome = error if error is not None else replies[i]
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._queue:
            self._send_next()
