"""Wiring of the collab service: settings -> draft store -> live documents ->
Rails authenticator -> a WebSocket endpoint at any path (providers connect to
the base URL), plus /healthz, /readyz and /metrics. `channels-collab` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import deque

from channels_common.observability import health_routes, setup_logging, setup_sentry
from channels_common.server import serve
from channels_common.settings import CollabSettings
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from .connection import RESET_CONNECTION, UNSUPPORTED_DATA, Connection, Limits
from .documents import DocumentRegistry
from .metrics import CollabMetrics
from .rails import RailsAuthenticator
from .store import DraftStore

log = logging.getLogger("channels.collab")

# Bytes queued for one client that does not read; past this it is closed
# with 4205 and resyncs on reconnect (CRDT state loses nothing).
MAX_CLIENT_BUFFER_BYTES = 32 * 1024 * 1024
AWARENESS_SWEEP_SECONDS = 3.0
DRAFT_SWEEP_SECONDS = 30.0


class WebSocketTransport:
    """Frames go through one writer task per socket, so `send` never blocks
    the caller (a broadcast loop) and frames keep their order."""

    def __init__(self, websocket: WebSocket, on_overflow):
        self.websocket = websocket
        self.on_overflow = on_overflow
        self.queue: deque[bytes] = deque()
        self.buffered = 0
        self.wakeup = asyncio.Event()
        self.close_with: tuple[int, str] | None = None
        self.done = False
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, frame: bytes) -> None:
        if self.close_with is not None:
            return
        self.queue.append(frame)
        self.buffered += len(frame)
        if self.buffered > MAX_CLIENT_BUFFER_BYTES:
            log.warning("client does not read its frames; closing it", extra={"buffered": self.buffered})
            self.queue.clear()
            self.buffered = 0
            # Not from inside the caller's broadcast loop.
            asyncio.get_running_loop().call_soon(self.on_overflow)
        self.wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if self.close_with is None:
            self.close_with = (code, reason)
            self.wakeup.set()

    async def _write(self) -> None:
        ws = self.websocket
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while self.queue:
                    frame = self.queue.popleft()
                    self.buffered -= len(frame)
                    await ws.send_bytes(frame)
                if self.close_with is not None:
                    await ws.close(*self.close_with)
                    return
                if self.done:
                    return
        except Exception:  # noqa: BLE001 - the client went away mid-write, whatever the server raised
            self.queue.clear()
            self.close_with = self.close_with or (1006, "gone")

    async def finish(self, timeout: float = 2.0) -> None:
        """Flush what is queued (and the close frame, if any), then stop."""
        self.done = True
        self.wakeup.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.writer), timeout)
        self.writer.cancel()


class CollabService:
    def __init__(self, settings: CollabSettings, metrics: CollabMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or CollabMetrics()
        self.store = DraftStore(settings.max_drafts, settings.draft_max_idle_seconds)
        self.limits = Limits(
            timeout_seconds=settings.timeout_ms / 1000,
            max_frame_bytes=settings.max_frame_bytes,
            broadcast_stateless=settings.broadcast_stateless,
        )
        self.sockets: set[Connection] = set()
        self.registry: DocumentRegistry | None = None
        self.authenticator: RailsAuthenticator | None = None
        self._tasks: list[asyncio.Task] = []
        self.ready = False
        self.stopping = False
        m = self.metrics
        m.open_sockets.set_function(lambda: len(self.sockets))
        m.loaded_documents.set_function(lambda: len(self.registry.docs) if self.registry else 0)
        m.stored_drafts.set_function(lambda: len(self.store))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self.registry = DocumentRegistry(
            self.store,
            debounce_seconds=s.debounce_ms / 1000,
            max_debounce_seconds=s.max_debounce_ms / 1000,
            metrics=self.metrics,
            call_later=loop.call_later,
        )
        self.authenticator = RailsAuthenticator(s.rails_base_url, timeout_seconds=s.auth_timeout_seconds)
        self._tasks.append(loop.create_task(self._sweep()))
        self.ready = True
        log.info(
            "collab ready",
            extra={"rails": s.rails_base_url, "timeout_ms": s.timeout_ms, "debounce_ms": s.debounce_ms,
                   "max_debounce_ms": s.max_debounce_ms},
        )

    async def _sweep(self) -> None:
        interval = min(1.0, self.limits.timeout_seconds / 4)
        last_awareness = last_drafts = time.monotonic()
        reported_evictions = 0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.sockets):
                try:
                    conn.check(now)
                except Exception:
                    log.exception("socket check failed")
            if now - last_awareness >= AWARENESS_SWEEP_SECONDS:
                last_awareness = now
                self.registry.expire_awareness()
            if now - last_drafts >= DRAFT_SWEEP_SECONDS:
                last_drafts = now
                self.store.sweep()
                # Every bound (count on store, idle age here or on read) counts.
                if self.store.evicted > reported_evictions:
                    self.metrics.drafts_evicted.inc(self.store.evicted - reported_evictions)
                    reported_evictions = self.store.evicted

    async def drain(self) -> None:
        """SIGTERM: store every loaded document, then ask every provider to
        reconnect (4205), which they do, to the next instance."""
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        saved = self.registry.save_all() if self.registry else 0
        closing = list(self.sockets)
        for conn in closing:
            conn.close(RESET_CONNECTION, "Reset Connection")
        log.info("shutting down: documents stored, sockets closed", extra={"documents": saved, "sockets": len(closing)})
        writers = [c.transport.finish() for c in closing]
        if writers:
            await asyncio.gather(*writers, return_exceptions=True)

    async def stop(self) -> None:
        await self.drain()
        for task in self._tasks:
            task.cancel()
        if self.authenticator:
            await self.authenticator.aclose()

    async def endpoint(self, websocket: WebSocket) -> None:
        if self.stopping:
            await websocket.close(RESET_CONNECTION)
            return
        await websocket.accept()
        conn: Connection | None = None

        def overflow():
            if conn is not None:
                conn.close(RESET_CONNECTION, "Reset Connection")

        transport = WebSocketTransport(websocket, overflow)
        conn = Connection(transport, self.registry, self.authenticator, self.limits, self.metrics)
        self.sockets.add(conn)
        try:
            # Read until the client is gone, even after we closed: the close
            # handshake cannot complete while unread frames back up.
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    if not conn.closed:
                        log.warning("text frame on the collab socket; closing it")
                        conn.close(UNSUPPORTED_DATA, "Binary frames only")
                    continue
                conn.receive(data)
        except Exception:
            log.exception("socket loop failed")
        finally:
            conn.disconnected()
            self.sockets.discard(conn)
            await transport.finish()


def create_app(settings: CollabSettings | None = None) -> Starlette:
    settings = settings or CollabSettings()
    service = CollabService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        _forward_signals_through(service)
        yield
        await service.stop()

    routes = health_routes(
        service.metrics.registry,
        lambda: (service.ready, {"documents": len(service.registry.docs) if service.registry else 0,
                                 "sockets": len(service.sockets)}),
    )
    routes.append(WebSocketRoute("/{path:path}", service.endpoint))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


def _forward_signals_through(service: CollabService) -> None:
    """The server closes open WebSockets with 1012 on SIGTERM before the app
    hears of it; catch the signal first, store and close with 4205, then pass
    it on to the server's own handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            async def drain_then_forward():
                try:
                    await service.drain()
                finally:
                    previous(signum, frame)

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_forward()))

        signal.signal(sig, handler)


def main() -> None:
    settings = CollabSettings()
    setup_logging("collab", settings.log_level)
    setup_sentry(settings.sentry_dsn, "collab")
    serve(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        grace_seconds=settings.shutdown_grace_seconds,
        ws_max_size=settings.max_frame_bytes,
        ws="websockets-sansio",
    )


if __name__ == "__main__":
    main()
