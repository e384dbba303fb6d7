"""Wiring of the records service: settings -> Redis -> Socket.IO server ->
relay, plus /healthz, /readyz and /metrics. `main()` is the console script
`channels-records`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets

import socketio
from channels_common.observability import health_routes, observe_service, setup_logging, setup_sentry
from channels_common.redis import Subscription, create_redis
from channels_common.server import freeze_startup_objects, serve
from channels_common.settings import RecordsSettings
from channels_common.wsserver import LeanWebSocketProtocol
from starlette.applications import Starlette

from .broadcast import Broadcaster
from .connections import Connections
from .engine import RecordsSocketServer
from .metrics import Metrics
from .playground import playground_routes
from .recovery import RecoveryStore, offset_key
from .relay import NOTICE_CHANNEL, RECORDS_CHANNEL, Relay

log = logging.getLogger("channels.records")

# Largest packet a client may send; Loomio clients send nothing but the
# handshake, so a small bound costs nothing.
MAX_CLIENT_PACKET_BYTES = 64 * 1024


_TOKEN_IN_QUERY = re.compile(r"(channel_token=)[^&\s\"']*")


class RedactQueryTokens(logging.Filter):
    """uvicorn logs websocket request lines, query string included, and the
    channel token travels in the query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "channel_token=" in message:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1[redacted]", message)
            record.args = ()
        return True


def _library_logger(name: str) -> logging.Logger:
    """python-socketio/engineio log packet contents (the recovery pid among
    them) at INFO: only their warnings and errors are kept, whatever
    LOG_LEVEL says, and they go through the service's JSON logging."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.WARNING)
    return logger


class RecordsService:
    def __init__(self, settings: RecordsSettings):
        self.settings = settings
        self.metrics = Metrics()
        origin = settings.cors_origin
        if origin is None:
            log.warning("no PUBLIC_APP_URL (or CANONICAL_HOST/VIRTUAL_HOST): only same-origin browsers may connect")
        self.sio = RecordsSocketServer(
            async_mode="asgi",
            cors_allowed_origins=[origin] if origin else None,
            cors_credentials=True,
            max_http_buffer_size=MAX_CLIENT_PACKET_BYTES,
            logger=_library_logger("channels.records.socketio"),
            engineio_logger=_library_logger("channels.records.engineio"),
            connect_handler=self._connect,
        )
        self.broadcaster = Broadcaster(
            self.sio.eio,
            self.sio.manager,
            limit_bytes=settings.max_client_buffer_bytes,
            on_overflow=self._evict,
            counters=self.metrics.hot,
            order_key=offset_key,
        )
        self.sio.on("disconnect", self._disconnect)
        self.redis = None
        self.store = None
        self.connections: Connections | None = None
        self.subscription: Subscription | None = None
        self._tasks: list[asyncio.Task] = []
        self._evicting: set[str] = set()
        observe_service(self.metrics.registry, "records", self._ready,
                        lambda: bool(self.subscription and self.subscription.live))
        self.app = socketio.ASGIApp(
            self.sio,
            other_asgi_app=Starlette(
                # playground_routes() is empty unless in development (RAILS_ENV != production).
                routes=[*health_routes(self.metrics.registry, self._ready), *playground_routes()],
                lifespan=self._lifespan,
            ),
            socketio_path="socket.io",
        )

    def _ready(self):
        live = bool(self.subscription and self.subscription.live)
        return live, {"redis_subscription": live}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        s = self.settings
        self.redis = create_redis(s.redis_url, max_connections=s.redis_pool_size)
        self.store = RecoveryStore(
            self.redis, window_seconds=s.recovery_window_seconds, instance_id=secrets.token_hex(6)
        )
        relay = Relay(self.broadcaster, self.metrics, self.store)
        self.connections = Connections(
            self.sio,
            self.broadcaster,
            self.redis,
            self.metrics,
            self.store,
            touch_interval=max(1.0, min(60.0, s.recovery_window_seconds / 4)),
            order_key=offset_key,
            relayed_offset=lambda: relay.last_offset,
        )
        self.subscription = Subscription(
            url=s.redis_url,
            batch_handler=relay.handle_batch,
            channels=(RECORDS_CHANNEL, NOTICE_CHANNEL),
            on_reconnect=self.metrics.redis_reconnects.inc,
            # Pub/sub messages published while it was down were never seen:
            # the store's occurrence count for cross-instance dedup restarts.
            on_live=self.store.mark_live,
        )
        self.subscription.start()
        self._tasks.append(asyncio.create_task(self.connections.touch_forever()))
        freeze_startup_objects()
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await self.subscription.stop()
            await self.redis.aclose()

    async def _connect(self, eio_sid: str, auth) -> None:
        await self.connections.connect(eio_sid, auth)

    def _disconnect(self, sid: str, reason: str) -> None:
        if self.connections is not None:
            self.connections.disconnected(sid, reason)

    def _evict(self, eio_sid: str) -> None:
        """A socket would exceed its send buffer: cut it off (once)."""
        if eio_sid in self._evicting:
            return
        self._evicting.add(eio_sid)
        self.broadcaster.drop_held(eio_sid)
        asyncio.get_running_loop().create_task(self._evict_now(eio_sid))

    async def _evict_now(self, eio_sid: str) -> None:
        try:
            sock = self.sio.eio.sockets.get(eio_sid)
            if sock is None:
                return
            self.metrics.slow_clients.inc()
            websocket = getattr(sock, "websocket", None)
            transport = getattr(websocket, "transport", None)
            buffered = sock.queue.bytes + (transport.get_write_buffer_size() if transport is not None else 0)
            log.warning(
                "client not reading, disconnecting",
                extra={"buffered_bytes": buffered, "limit": self.settings.max_client_buffer_bytes},
            )
            await sock.close(wait=False, abort=True)
            sock.queue.discard_all()
            sock.queue.put_nowait(None)  # ends a pending long-poll or the writer
            if websocket is not None:
                websocket.abort()
        except Exception:
            log.exception("evicting a slow client failed")
        finally:
            self._evicting.discard(eio_sid)

    async def stop(self) -> None:
        if self.connections is not None:
            await self.connections.close_all()


def main() -> None:
    settings = RecordsSettings()
    setup_logging("records", settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactQueryTokens())
    # At DEBUG the websockets library logs every frame through uvicorn's
    # logger, recovery pids and payloads included: never below INFO.
    quiet = max(logging.getLogger().level, logging.INFO)
    for name in ("uvicorn.error", "websockets"):
        logging.getLogger(name).setLevel(quiet)
    setup_sentry(settings.sentry_dsn, "records")
    service = RecordsService(settings)
    serve(
        service.app,
        host=settings.host,
        port=settings.port,
        grace_seconds=settings.shutdown_grace_seconds,
        on_stop=service.stop,
        # Our own websocket protocol: the least state per idle client and
        # its transport within reach of the broadcast fast path.
        ws=LeanWebSocketProtocol,
        ws_max_size=MAX_CLIENT_PACKET_BYTES + 16,
    )


if __name__ == "__main__":
    main()
