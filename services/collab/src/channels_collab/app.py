"""Wiring of the collab service: settings -> cluster (Redis) -> live documents ->
Rails authenticator -> a WebSocket endpoint at any path (providers connect to
the base URL), plus /healthz, /readyz and /metrics. `channels-collab` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from channels_common.closecodes import (
    CONNECTION_TIMEOUT,
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    RESET_CONNECTION,
    UNSUPPORTED_DATA,
)
from channels_common.httphead import HeadGuard, guarded_httptools
from channels_common.observability import health_routes, observe_service, setup_logging, setup_sentry
from channels_common.server import freeze_startup_objects, serve
from channels_common.settings import CollabSettings
from channels_common.tasks import spawn
from channels_common.wsframe import binary_frame
from channels_common.wsserver import DETACH, HTTP_RESPONSE, KeepAlive, LeanWebSocketProtocol, abort_hung_up
from starlette.applications import Starlette

from .client_address import scope_client_address
from .cluster import Cluster
from .connection import Connection, Limits
from .documents import DocumentRegistry
from .metrics import CollabMetrics
from .rails import RailsAuthenticator
from .signals import drain_before_signals
from .store import DraftStore
from .throttle import Refused, Throttle

log = logging.getLogger("channels.collab")

# Bytes queued for one client that does not read; past this it is closed
# with 4205 and resyncs on reconnect (CRDT state loses nothing).
MAX_CLIENT_BUFFER_BYTES = 32 * 1024 * 1024
AWARENESS_SWEEP_SECONDS = 3.0
DRAFT_SWEEP_SECONDS = 30.0
# On SIGTERM, how long queued appends, awareness removals and compactions
# may take to reach Redis before the sockets are closed anyway.
DRAIN_FLUSH_SECONDS = 3.0
# Sockets or documents a sweep handles per turn of the event loop: a sweep
# over thousands must not hold up the updates arriving meanwhile.
SWEEP_BATCH = 200


async def _in_batches(items: list, handle: Callable[[list], object]) -> None:
    for start in range(0, len(items), SWEEP_BATCH):
        if start:
            await asyncio.sleep(0)
        handle(items[start:start + SWEEP_BATCH])


class SocketTransport:
    """A client's frames go straight onto its socket's transport, in the
    order they are sent: no queue, no writer task, nothing awaited, so an
    update reaches every peer within the callback that received it."""

    __slots__ = ("closed", "on_overflow", "protocol", "transport")

    def __init__(self, protocol, on_overflow: Callable[[], None] | None):
        self.protocol = protocol
        self.transport = protocol.transport
        self.on_overflow = on_overflow
        self.closed = False

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        transport = self.transport
        if transport.is_closing():
            self.closed = True
            return
        transport.write(binary_frame(frame))
        buffered = transport.get_write_buffer_size()
        if buffered > MAX_CLIENT_BUFFER_BYTES:
            log.warning("client does not read its frames; closing it", extra={"buffered": buffered})
            self.closed = True
            # Not from inside the caller's broadcast loop.
            asyncio.get_running_loop().call_soon(self.on_overflow)

    def close(self, code: int, reason: str) -> None:
        if not self.transport.is_closing():
            self.protocol.close(code, reason)
        self.closed = True

    def pause_reading(self, reason: str) -> None:
        self.protocol.pause_reading(reason)

    def resume_reading(self, reason: str) -> None:
        self.protocol.resume_reading(reason)


class CollabApp:
    """Every WebSocket, whatever its path (providers connect to the base
    URL), goes to the service with the server's own `send`: the lean
    protocol's detach needs it, and Starlette's middleware would wrap it.
    Everything else (health, metrics, lifespan) goes to Starlette."""

    def __init__(self, service: CollabService, http: Starlette):
        self.service = service
        self.http = http
        self.state = http.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await self.service.endpoint(scope, receive, send)
        else:
            await self.http(scope, receive, send)


class CollabService:
    def __init__(self, settings: CollabSettings, metrics: CollabMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or CollabMetrics()
        # Only the registry's fallback; drafts live in Redis (the cluster).
        self.store = DraftStore(0, settings.draft_ttl_seconds)
        self.cluster: Cluster | None = None
        self.limits = Limits(
            timeout_seconds=settings.timeout_ms / 1000,
            max_frame_bytes=settings.max_frame_bytes,
            broadcast_stateless=settings.broadcast_stateless,
        )
        self.sockets: set[Connection] = set()
        # RFC 6455 pings every socket, as Hocuspocus does: a quiet reader
        # (a v3 provider renews awareness only every 15 s, less in a
        # background tab) stays, a dead peer goes.
        self.keepalive = KeepAlive(self.limits.timeout_seconds)
        self.throttle = Throttle(settings.throttle_attempts, settings.throttle_window_seconds,
                                 settings.throttle_ban_seconds, time.monotonic) if settings.throttle_attempts else None
        self.trusted_proxies = settings.trusted_proxy_networks
        self.registry: DocumentRegistry | None = None
        self.authenticator: RailsAuthenticator | None = None
        self._tasks: list[asyncio.Task] = []
        self.ready = False
        self.stopping = False
        m = self.metrics
        m.open_sockets.set_function(lambda: len(self.sockets))
        m.loaded_documents.set_function(lambda: len(self.registry.docs) if self.registry else 0)
        m.rails_calls.set_function(lambda: self.authenticator.share.running if self.authenticator else 0)
        m.rails_waiting.set_function(lambda: self.authenticator.share.waiting if self.authenticator else 0)

    def readiness(self) -> tuple[bool, dict]:
        """Ready when accepting sockets and Redis takes appends and reads."""
        cluster = self.cluster
        redis_ok = cluster is not None and cluster.healthy
        return self.ready and redis_ok, {
            "documents": len(self.registry.docs) if self.registry else 0,
            "sockets": len(self.sockets),
            "redis": redis_ok,
            "unacked_updates": cluster.unacked_updates if cluster else 0,
        }

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.draft_ttl_seconds_set is None and s.draft_max_idle_seconds is not None:
            log.warning("COLLAB_DRAFT_MAX_IDLE_SECONDS is deprecated; use COLLAB_DRAFT_TTL_SECONDS",
                        extra={"draft_ttl_seconds": s.draft_ttl_seconds})
        self.cluster = Cluster(
            s.redis_url,
            prefix=s.redis_prefix,
            ttl_seconds=s.draft_ttl_seconds,
            max_unacked_bytes=s.max_unacked_bytes,
            metrics=self.metrics,
        )
        self.registry = DocumentRegistry(
            self.store,
            debounce_seconds=s.debounce_ms / 1000,
            max_debounce_seconds=s.max_debounce_ms / 1000,
            metrics=self.metrics,
            call_later=loop.call_later,
            history=self.cluster,
        )
        self.cluster.start()
        # An auth never outlives the connection deadline (see Connection.check).
        auth_timeout = min(s.auth_timeout_seconds, self.limits.timeout_seconds)
        self.authenticator = RailsAuthenticator(s.rails_base_url, timeout_seconds=auth_timeout)
        await self.authenticator.warm_up()
        self._tasks.append(spawn(self._sweep(), name="collab-sweep"))
        self.ready = True
        freeze_startup_objects()
        log.info(
            "collab ready",
            extra={"rails": s.rails_base_url, "instance": self.cluster.instance, "redis_prefix": s.redis_prefix,
                   "timeout_ms": s.timeout_ms, "debounce_ms": s.debounce_ms, "max_debounce_ms": s.max_debounce_ms},
        )

    async def _sweep(self) -> None:
        interval = min(1.0, self.limits.timeout_seconds / 4)
        last_awareness = last_drafts = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            await _in_batches(list(self.sockets), lambda conns, now=now: self._check_sockets(conns, now))
            if now - last_awareness >= AWARENESS_SWEEP_SECONDS:
                last_awareness = now
                now_ms = time.time() * 1000
                await _in_batches(
                    list(self.registry.docs.values()), lambda docs, at=now_ms: self.registry.expire_awareness(at, docs)
                )
                self.registry.unload_unused(now)
            if now - last_drafts >= DRAFT_SWEEP_SECONDS:
                last_drafts = now
                await self.cluster.refresh_ttls()

    def _check_sockets(self, conns: list[Connection], now: float) -> None:
        # A socket paused for its pending auths hears nothing of its peer:
        # one that hung up is let go here, and its auths with it.
        paused = [conn.transport.protocol for conn in conns
                  if not conn.closed and conn.transport.protocol.read_paused]
        if paused:
            gone = abort_hung_up(paused)
            if gone:
                log.info("peers hung up while their reading was paused; their pending auths are cancelled",
                         extra={"sockets": gone})
        keepalive = self.keepalive
        for conn in conns:
            try:
                conn.check(now)
                if keepalive.dead(conn.transport.protocol, now):
                    log.info("collab socket did not answer a ping; closing it")
                    conn.close(CONNECTION_TIMEOUT, "Connection Timeout")
            except Exception:
                log.exception("socket check failed")

    async def drain(self) -> None:
        """SIGTERM: store every loaded document, then ask every provider to
        reconnect (4205), which they do, to the next instance."""
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        saved = self.registry.save_all() if self.registry else 0
        closing = list(self.sockets)
        # Leaving removes each client's awareness, here and on the other
        # instances (published to Redis), and compacts the documents.
        for conn in closing:
            conn.close(RESET_CONNECTION, "Reset Connection")
        if self.cluster:
            # Other instances stop writing to this one's inbox.
            self.cluster.leave_all()
        flushed = await self.cluster.flush(DRAIN_FLUSH_SECONDS) if self.cluster else True
        # Close frames are flushed by the transports as the server shuts them.
        log.info(
            "shutting down: documents stored, sockets closed",
            extra={"documents": saved, "sockets": len(closing), "all_in_redis": flushed,
                   "unacked_updates": self.cluster.unacked_updates if self.cluster else 0},
        )

    async def stop(self) -> None:
        await self.drain()
        for task in self._tasks:
            task.cancel()
        if self.cluster:
            await self.cluster.stop()
        if self.authenticator:
            await self.authenticator.aclose()

    async def _refuse_throttled(self, scope, send, address: str, refused: Refused) -> None:
        """429 before the upgrade; logged once per ban, counted every time."""
        self.metrics.throttled.inc()
        if refused.ban_started:
            log.warning("too many connection attempts; client banned",
                        extra={"client": address, "ban_seconds": self.settings.throttle_ban_seconds})
        if HTTP_RESPONSE not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})  # a bare 403 is all the server can say
            return
        body = b"Too many connection attempts"
        await send({"type": "websocket.http.response.start", "status": 429, "headers": [
            (b"retry-after", refused.retry_after_header), (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body))]})
        await send({"type": "websocket.http.response.body", "body": body})

    async def endpoint(self, scope, receive, send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if self.throttle is not None:
            address = scope_client_address(scope, self.trusted_proxies)
            refused = self.throttle.attempt(address) if address is not None else None
            if refused is not None:
                await self._refuse_throttled(scope, send, address, refused)
                return
        if self.stopping:
            await send({"type": "websocket.close", "code": RESET_CONNECTION})
            return
        protocol = getattr(send, "__self__", None)
        if DETACH not in scope.get("extensions", {}) or not hasattr(protocol, "close"):
            log.error("collab runs on channels_common's lean websocket protocol only; refusing the socket")
            await send({"type": "websocket.close", "code": INTERNAL_ERROR})
            return
        await send({"type": "websocket.accept"})
        transport = SocketTransport(protocol, None)
        conn = ServedConnection(self, transport)
        transport.on_overflow = conn.overflow
        self.sockets.add(conn)

        # From here the protocol calls us per message; this coroutine ends.
        await send({"type": DETACH, "on_message": conn.on_message, "on_close": conn.on_close})


class ServedConnection(Connection):
    """A Connection on a live socket of the service: the lean protocol's
    callbacks are its bound methods, not closures made per socket."""

    __slots__ = ("service",)

    def __init__(self, service: CollabService, transport: SocketTransport):
        super().__init__(transport, service.registry, service.authenticator, service.limits, service.metrics)
        self.service = service

    def on_message(self, data) -> None:
        try:
            if type(data) is bytes:
                self.receive(data)
            elif not self.closed:
                log.warning("text frame on the collab socket; closing it")
                self.close(UNSUPPORTED_DATA, "Binary frames only")
        except Exception:
            # A fault of ours: this socket's state is unknown, the others carry on.
            log.exception("frame handling failed; closing the socket")
            self.close(INTERNAL_ERROR, "Internal Error")

    def on_close(self, _code: int) -> None:
        # Also after our own close: the client answered or was cut off.
        self.transport.closed = True
        self.disconnected()
        self.service.sockets.discard(self)

    def overflow(self) -> None:
        self.close(RESET_CONNECTION, "Reset Connection")


def create_app(settings: CollabSettings | None = None) -> CollabApp:
    settings = settings or CollabSettings()
    service = CollabService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        drain_before_signals(service)
        yield
        await service.stop()

    observe_service(service.metrics.registry, "collab", lambda: service.ready)
    routes = health_routes(
        service.metrics.registry,
        lambda: service.readiness(),
    )
    http = Starlette(routes=routes, lifespan=lifespan)
    http.state.service = service
    return CollabApp(service, http)


def main() -> None:
    settings = CollabSettings()
    setup_logging("collab", settings.log_level)
    setup_sentry(settings.sentry_dsn, "collab")
    app = create_app(settings)
    metrics = app.service.metrics
    # Request heads (the upgrade's included) are read by uvicorn's httptools
    # protocol, which has no deadline of its own: this one gives it one.
    heads = HeadGuard(settings.http_head_timeout_seconds, settings.http_max_pending_heads,
                      on_close=lambda cause: metrics.heads_closed.labels(cause).inc())
    serve(
        app,
        http=guarded_httptools(heads),
        host=settings.host,
        port=settings.port,
        grace_seconds=settings.shutdown_grace_seconds,
        ws_max_size=settings.max_frame_bytes,
        # The client address is the socket's peer; X-Forwarded-For is read
        # by the throttle for TRUSTED_PROXIES only (uvicorn's own rewrite
        # would believe any local peer, whatever TRUSTED_PROXIES says).
        proxy_headers=False,
        # Frames are handled in the callback that reads them and written
        # straight to the peers' transports (see SocketTransport).
        ws=LeanWebSocketProtocol,
    )


if __name__ == "__main__":
    main()
