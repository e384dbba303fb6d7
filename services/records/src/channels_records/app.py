"""Wiring of the records service: settings -> Redis -> Socket.IO server ->
relay, plus /healthz, /readyz and /metrics. `main()` is the console script
`channels-records`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets

from channels_common.httphead import HeadGuard
from channels_common.observability import health_routes, observe_service, setup_logging, setup_sentry
from channels_common.redis import Subscription, create_redis
from channels_common.server import freeze_startup_objects, serve
from channels_common.settings import RecordsSettings
from channels_common.tasks import spawn
from channels_common.wsserver import LeanWebSocketProtocol
from starlette.applications import Starlette

from . import engineio as eio
from .broadcast import Broadcaster
from .connections import Connections
from .gateway import Gateway
from .httpserver import RecordsHttpProtocol
from .metrics import Metrics
from .playground import playground_routes
from .polling import AsgiPolling, Cors, Polling
from .recovery import RecoveryStore, offset_key
from .relay import NOTICE_CHANNEL, RECORDS_CHANNEL, Relay
from .sockets import Engine, Rooms
from .websocket import WebSockets

log = logging.getLogger("channels.records")

# Largest packet a client may send; Loomio clients send nothing but the
# handshake, so a small bound costs nothing.
MAX_CLIENT_PACKET_BYTES = 64 * 1024
SOCKET_IO_PATHS = ("/socket.io/", "/socket.io")


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


class RecordsService:
    def __init__(self, settings: RecordsSettings):
        self.settings = settings
        self.metrics = Metrics()
        origin = settings.cors_origin
        if origin is None:
            log.warning("no PUBLIC_APP_URL (or CANONICAL_HOST/VIRTUAL_HOST): only same-origin browsers may connect")
        self.rooms = Rooms()
        self.engine = Engine(max_payload=MAX_CLIENT_PACKET_BYTES)
        self.broadcaster = Broadcaster(
            self.engine,
            self.rooms,
            limit_bytes=settings.max_client_buffer_bytes,
            on_overflow=self._evict,
            counters=self.metrics.hot,
            order_key=offset_key,
        )
        self.gateway = Gateway(self.rooms, self.broadcaster)
        self.engine.on_message = self.gateway.on_message
        self.engine.on_close = self.gateway.on_close
        self.engine.connected = self.gateway.connecting_or_connected
        cors = Cors(origin, credentials=True)
        self.polling = Polling(self.engine, cors)
        self.asgi_polling = AsgiPolling(self.polling)
        self.websockets = WebSockets(self.engine, cors)
        self.redis = None
        self.store = None
        self.connections: Connections | None = None
        self.subscription: Subscription | None = None
        self.relay: Relay | None = None
        self._tasks: list[asyncio.Task] = []
        self._evicting: set[str] = set()
        observe_service(self.metrics.registry, "records", self._ready,
                        lambda: bool(self.subscription and self.subscription.live))
        # playground_routes() is empty unless in development (RAILS_ENV != production).
        self.other = Starlette(
            routes=[*health_routes(self.metrics.registry, self._ready), *playground_routes()],
            lifespan=self._lifespan,
        )

    async def app(self, scope, receive, send) -> None:
        """/socket.io/ is Engine.IO (polling or websocket); the rest is Starlette."""
        kind = scope["type"]
        if scope.get("path") in SOCKET_IO_PATHS:
            if kind == "http":
                return await self.asgi_polling(scope, receive, send)
            if kind == "websocket":
                return await self.websockets(scope, receive, send)
        return await self.other(scope, receive, send)

    def _ready(self):
        live = bool(self.subscription and self.subscription.live)
        return live, {"redis_subscription": live}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        s = self.settings
        self.redis = create_redis(s.redis_url, max_connections=s.redis_pool_size)
        self.store = RecoveryStore(
            self.redis,
            window_ms=s.recovery_window_seconds * 1000,
            instance_id=secrets.token_hex(6),
            max_events_per_room=s.recovery_max_events_per_room,
        )
        epochs = self.store.keys.epoch  # counter key and marker channel (see EventLog.set_epoch)
        relay = self.relay = Relay(
            self.broadcaster, self.metrics, self.store, epoch_channel=epochs,
            rooms=lambda: list(self.rooms.members), on_lost=self._room_lost,
        )
        self.connections = Connections(
            self.engine,
            self.rooms,
            self.broadcaster,
            self.redis,
            self.metrics,
            self.store,
            touch_interval=max(1.0, min(60.0, s.recovery_window_seconds / 4)),
            order_key=offset_key,
            relayed_offset=lambda: relay.last_offset,
            relayed_count=lambda: relay.emitted,
            feed=lambda: self.subscription.generation if self.subscription.live else None,
            wait_feed=lambda timeout: self.subscription.wait_live(timeout),
        )
        self.subscription = Subscription(
            url=s.redis_url,
            batch_handler=relay.handle_batch,
            channels=(RECORDS_CHANNEL, NOTICE_CHANNEL),
            on_reconnect=self.metrics.redis_reconnects.inc,
            on_live=self._feed_live,
            read_clock=True,
            epoch_channel=epochs,
        )
        self.subscription.start()
        self.gateway.connections = self.connections
        self._tasks.append(spawn(self.connections.touch_forever(), name="records-touch"))
        freeze_startup_objects()
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            self.engine.stop_pinger()
            await self.subscription.stop()
            await self.redis.aclose()

    def _feed_live(self):
        """The subscription is (again) live. Messages published while it was
        down were never seen: the store's occurrence count for cross-instance
        dedup restarts. With epoch markers, the subscription's own marker is
        the first message to come and restarts it exactly there, in order
        behind any message of the old epoch still held. Without, it restarts
        from the moment the subscription began (Redis clock). After a drop,
        the relay first catches up on what other instances logged meanwhile
        (Relay.resubscribed)."""
        if self.subscription.generation > 1:
            self.relay.resubscribed()
        if self.subscription.epoch_channel:
            return None
        self.store.set_epoch(None)
        at = self.subscription.subscribed_at_ms
        if at is not None:
            self.store.listening_since(at)
            return None
        return self.store.mark_live()  # Redis did not tell the time: from now, less a grace

    def _room_lost(self, room: str) -> None:
        """Events of `room` were missed and cannot be replayed here: its
        sockets are cut, so that their clients reconnect and recover (or
        start afresh, `recovered: false`) rather than live with a gap."""
        members = list(self.rooms.members.get(room, {}).values())
        log.warning("events missed while resubscribing cannot be replayed, disconnecting the room's sockets",
                    extra={"sockets": len(members)})
        for eio_sid in members:
            sock = self.engine.sockets.get(eio_sid)
            if sock is not None and not sock.closing:
                sock.close(eio.TRANSPORT_CLOSE, abort=True)

    def _evict(self, eio_sid: str) -> None:
        """A socket would exceed its send buffer: cut it off (once)."""
        if eio_sid in self._evicting:
            return
        self._evicting.add(eio_sid)
        self.broadcaster.drop_held(eio_sid)
        # Not while the broadcast that overflowed is still iterating its room.
        asyncio.get_running_loop().call_soon(self._evict_now, eio_sid)

    def _evict_now(self, eio_sid: str) -> None:
        try:
            sock = self.engine.sockets.get(eio_sid)
            if sock is None or sock.closing:
                return
            self.metrics.slow_clients.inc()
            transport = sock.transport
            buffered = sock.pending_bytes + (transport.get_write_buffer_size() if transport is not None else 0)
            log.warning(
                "client not reading, disconnecting",
                extra={"buffered_bytes": buffered, "limit": self.settings.max_client_buffer_bytes},
            )
            sock.close(eio.TRANSPORT_ERROR, abort=True)
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
        ws=LeanWebSocketProtocol,
        # The whole port is ours: long-polling answered inside the HTTP
        # protocol, other requests run on service.app, and upgrades go to our
        # websocket protocol (the least state per idle client, its transport
        # within reach of the broadcast fast path).
        http=RecordsHttpProtocol.serving(
            service.polling, app=service.app, websocket=LeanWebSocketProtocol, engine_websockets=service.websockets,
            head_guard=HeadGuard(settings.http_head_timeout_seconds, settings.http_max_pending_heads,
                                 on_close=lambda cause: service.metrics.heads_closed.labels(cause).inc()),
        ),
        ws_max_size=MAX_CLIENT_PACKET_BYTES + 16,
        interface="asgi3",  # service.app is a bound coroutine method
    )


if __name__ == "__main__":
    main()
