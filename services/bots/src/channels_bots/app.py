"""Wiring of the bots service: Redis chatbot/* -> parse -> dispatcher ->
Matrix. Serves only /healthz, /readyz and /metrics.

Shutdown (SIGTERM): the subscription stops first so no new message is taken,
then queued and in-flight sends get SHUTDOWN_GRACE_SECONDS, then the clients
are closed and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from channels_common.observability import health_routes, observe_service, setup_logging, setup_sentry
from channels_common.redis import Message, Subscription
from channels_common.server import serve
from channels_common.settings import BotsSettings
from channels_common.tasks import spawn
from starlette.applications import Starlette

from .dispatcher import Dispatcher, RetryPolicy
from .matrix import AliasCache, ClientCache, Matrix, make_client
from .messages import Rejected, parse
from .metrics import BotsMetrics

log = logging.getLogger("channels.bots")


class BotsService:
    def __init__(self, settings: BotsSettings, metrics: BotsMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or BotsMetrics()
        self.clients = ClientCache(
            max_size=settings.client_cache_size,
            idle_seconds=settings.client_idle_seconds,
            factory=lambda bot: make_client(bot, settings.request_timeout_seconds),
            on_evict=lambda cause: self.metrics.evicted.labels(cause).inc(),
        )
        self.matrix = Matrix(self.clients, AliasCache(ttl=settings.alias_ttl_seconds))
        self.dispatcher = Dispatcher(
            self.matrix,
            policy=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay=settings.retry_base_seconds,
                max_delay=settings.retry_max_seconds,
            ),
            max_concurrent=settings.max_concurrent_sends,
            max_per_server=settings.max_concurrent_sends_per_server,
            max_pending=settings.max_pending_messages,
            metrics=self.metrics,
        )
        self.subscription = Subscription(url=settings.redis_url, handler=self.handle, patterns=["chatbot/*"],
                                         on_reconnect=self.metrics.redis_reconnects.inc)
        self.metrics.cached_clients.set_function(lambda: len(self.clients))
        self.metrics.open_clients.set_function(lambda: self.clients.open_clients)
        self._sweeper: asyncio.Task | None = None

    def handle(self, message: Message) -> None:
        """One Redis message: a queued command, or one log line and dropped."""
        self.metrics.count_received(message.channel)
        try:
            command = parse(message.channel, message.data)
        except Rejected as rejected:
            log.warning(
                "chatbot message dropped",
                extra={"channel": message.channel[:100], "reason": rejected.reason, "detail": rejected.detail},
            )
            self.metrics.failed.labels(rejected.reason).inc()
            return
        self.dispatcher.submit(command)

    def ready(self) -> tuple[bool, dict]:
        live = self.subscription.live and self.dispatcher.accepting
        return live, {"redis": self.subscription.live, "pending": self.dispatcher.pending}

    async def start(self) -> None:
        self.subscription.start()
        self._sweeper = spawn(self._sweep_idle_clients(), name="bots-client-sweeper")

    async def stop(self) -> None:
        await self.subscription.stop()
        abandoned = await self.dispatcher.close(self.settings.shutdown_grace_seconds)
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.clients.close()
        log.info("stopped", extra={"abandoned": abandoned})

    async def _sweep_idle_clients(self) -> None:
        interval = max(0.5, min(30.0, self.settings.client_idle_seconds / 2))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.clients.sweep()
            except Exception:
                log.exception("sweeping idle clients failed")


def create_app(settings: BotsSettings | None = None) -> Starlette:
    settings = settings or BotsSettings()
    service = BotsService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    observe_service(service.metrics.registry, "bots", service.ready, lambda: service.subscription.live)
    app = Starlette(routes=health_routes(service.metrics.registry, service.ready), lifespan=lifespan)
    app.state.service = service
    return app


def main() -> None:
    settings = BotsSettings()
    setup_logging("bots", settings.log_level)
    # nio logs every request, and every error body it cannot validate; our
    # own lines say what happened to each message.
    logging.getLogger("nio").setLevel(logging.ERROR)
    setup_sentry(settings.sentry_dsn, "bots")
    serve(
        create_app(settings), host=settings.host, port=settings.port,
        grace_seconds=settings.shutdown_grace_seconds, ws="none",
    )


if __name__ == "__main__":
    main()
