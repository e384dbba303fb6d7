"""Wiring of the bots service: Redis chatbot/* -> parse -> dispatcher (with
claims in Redis shared by every instance) -> Matrix. Serves only /healthz,
/readyz and /metrics.

Ready: the subscription is live and a claims round trip to Redis succeeded
lately. Shutdown (SIGTERM): the subscription stops first so no new message
is taken, then the rooms this instance posts to get SHUTDOWN_GRACE_SECONDS,
their claims are released, the clients are closed and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from channels_common.observability import health_routes, observe_service, setup_logging, setup_sentry
from channels_common.redis import Message, Subscription, create_redis
from channels_common.server import serve
from channels_common.settings import BotsSettings
from channels_common.tasks import spawn
from starlette.applications import Starlette

from .claims import UNAVAILABLE, RedisClaims
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
        self.redis = create_redis(settings.redis_url, max_connections=20)
        self.claims = RedisClaims(
            self.redis, prefix=settings.redis_prefix, lease=settings.claim_lease_seconds,
            window=settings.dedupe_window_seconds,
        )
        self.claims_ok = False
        self.dispatcher = Dispatcher(
            self.matrix,
            claims=self.claims,
            policy=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay=settings.retry_base_seconds,
                max_delay=settings.retry_max_seconds,
            ),
            max_concurrent=settings.max_concurrent_sends,
            max_per_server=settings.max_concurrent_sends_per_server,
            max_pending=settings.max_pending_messages,
            max_pending_bytes=settings.max_pending_bytes,
            max_pending_age=settings.max_pending_age_seconds,
            settle=settings.settle_seconds,
            metrics=self.metrics,
        )
        self.subscription = Subscription(url=settings.redis_url, handler=self.handle, patterns=["chatbot/*"],
                                         on_live=self.dispatcher.settled_from,
                                         on_reconnect=self.metrics.redis_reconnects.inc)
        self.metrics.pending_oldest.set_function(self.dispatcher.oldest_age)
        self.metrics.cached_clients.set_function(lambda: len(self.clients))
        self.metrics.open_clients.set_function(lambda: self.clients.open_clients)
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

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
        self.dispatcher.submit(command, len(message.data))

    def ready(self) -> tuple[bool, dict]:
        live = self.subscription.live and self.claims_ok and self.dispatcher.accepting
        return live, {"redis": self.subscription.live, "claims": self.claims_ok, "pending": self.dispatcher.pending}

    async def start(self) -> None:
        log.info("starting", extra={"instance": self.claims.instance})
        self.subscription.start()
        self._sweeper = spawn(self._sweep_idle_clients(), name="bots-client-sweeper")
        self._watcher = spawn(self._watch_claims(), name="bots-claims-watch")

    async def stop(self) -> None:
        await self.subscription.stop()
        abandoned = await self.dispatcher.close(self.settings.shutdown_grace_seconds)
        for task in (self._sweeper, self._watcher):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.clients.close()
        await self.redis.aclose()
        log.info("stopped", extra={"abandoned": abandoned})

    async def _watch_claims(self) -> None:
        """Claims work (a round trip), checked a few times per lease; and
        messages kept past the age bound are dropped."""
        interval = max(0.1, min(5.0, self.settings.claim_lease_seconds / 3))
        while True:
            try:
                async with asyncio.timeout(max(1.0, interval)):
                    await self.claims.check()
                self.claims_ok = True
            except UNAVAILABLE as exc:
                if self.claims_ok:
                    log.warning("claims unavailable", extra={"error": str(exc) or type(exc).__name__})
                self.claims_ok = False
            self.dispatcher.expire()
            await asyncio.sleep(interval)

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
