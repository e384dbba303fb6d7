"""A deadline and a bound for HTTP request heads, per process.

A connection is "in its head" from when it opens (or, kept alive, from the
first byte of its next request) until the request's headers are complete. A
client that takes longer than `timeout_seconds` over it gets a 408 and the
connection is closed; past `max_heads` such connections, the one that has
been in its head longest is closed to make room. A real client sends its
head within a round trip or two, so neither ever bites one, while a client
that drips a header byte now and then (each holding a file descriptor and a
buffer) no longer can hold connections open for ever.

The owner is any HTTP protocol with `head_expired(cause)`: records' own
(httpserver.py) and, for collab, uvicorn's behind `guarded_httptools`.
One timer for all connections, running while any is in its head.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("channels.http")

DEADLINE = "deadline"
BOUND = "bound"
# Checks per timeout: a head is closed within timeout * (1 + 1 / CHECKS).
CHECKS = 5

REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 15\r\n"
    b"connection: close\r\n\r\nRequest Timeout"
)


class HeadGuard:
    def __init__(self, timeout_seconds: float, max_heads: int, *,
                 on_close: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.timeout_seconds = timeout_seconds
        self.max_heads = max_heads
        self.on_close = on_close
        self.clock = clock
        # Connections in their head -> when it began; insertion order is
        # that order, so the oldest come first.
        self._heads: dict[object, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = {DEADLINE: 0, BOUND: 0}  # since the last log line

    def __len__(self) -> int:
        return len(self._heads)

    def begin(self, conn) -> None:
        """`conn` starts a request head; one already in its head keeps its
        clock (a connection's first head counts from when it opened)."""
        heads = self._heads
        if conn in heads:
            return
        while len(heads) >= self.max_heads:
            oldest = next(iter(heads))
            del heads[oldest]
            self._close(oldest, BOUND)
        heads[conn] = self.clock()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_seconds / CHECKS, self._check)

    def end(self, conn) -> None:
        """`conn`'s head is complete, or the connection is gone."""
        self._heads.pop(conn, None)

    def _close(self, conn, cause: str) -> None:
        self._closed[cause] += 1
        if self.on_close is not None:
            self.on_close(cause)
        if cause == BOUND and self._closed[BOUND] == 1:
            log.warning("too many connections in their request head; the longest waiting are closed",
                        extra={"limit": self.max_heads})
        try:
            conn.head_expired(cause)
        except Exception:
            log.exception("closing a connection in its request head failed")

    def _check(self) -> None:
        self._timer = None
        cutoff = self.clock() - self.timeout_seconds
        heads = self._heads
        while heads:
            conn, since = next(iter(heads.items()))
            if since > cutoff:
                break
            del heads[conn]
            self._close(conn, DEADLINE)
        closed = self._closed
        if closed[DEADLINE] or closed[BOUND]:
            log.info("connections closed in their request head",
                     extra={"deadline": closed[DEADLINE], "bound": closed[BOUND],
                            "timeout_seconds": self.timeout_seconds, "limit": self.max_heads})
            self._closed = {DEADLINE: 0, BOUND: 0}
        if heads:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_seconds / CHECKS, self._check)


def expire_head(transport) -> None:
    """What a protocol's `head_expired` usually does: 408, then close."""
    if transport is not None and not transport.is_closing():
        transport.write(REQUEST_TIMEOUT_RESPONSE)
        transport.close()


def guarded_httptools(guard: HeadGuard) -> type:
    """uvicorn's httptools protocol class with `guard` on its heads (for
    Config(http=...)): a head begins when the connection opens and at each
    request's first byte, and ends when its headers are complete (for an
    upgrade, before the websocket protocol takes the connection over)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            guard.begin(self)

        def connection_lost(self, exc) -> None:
            guard.end(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            guard.begin(self)
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            guard.end(self)
            super().on_headers_complete()

        def head_expired(self, cause: str) -> None:
            expire_head(self.transport)

    return GuardedHttpToolsProtocol
