"""The service's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Redis channel names become a label; anything else is folded into "other"
# so a hostile publisher cannot grow the label set.
KNOWN_CHANNELS = ("chatbot/test", "chatbot/publish")


class BotsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "bots_messages_received", "chatbot/* messages received, by Redis channel", ["channel"], registry=r
        )
        self.sent = Counter("bots_messages_sent", "Matrix events posted, by kind", ["kind"], registry=r)
        self.retried = Counter(
            "bots_messages_retried", "Delivery attempts repeated, by cause", ["reason"], registry=r
        )
        self.failed = Counter(
            "bots_messages_failed", "Messages dropped or not delivered, by reason", ["reason"], registry=r
        )
        self.evicted = Counter(
            "bots_clients_evicted", "Cached Matrix clients dropped, by cause", ["cause"], registry=r
        )
        self.cached_clients = Gauge("bots_cached_clients", "Matrix clients in the cache", registry=r)
        self.open_clients = Gauge(
            "bots_open_clients", "Matrix clients open (cached, fresh, evicted but in use)", registry=r
        )
        self.pending = Gauge("bots_pending_messages", "Messages queued or being delivered", registry=r)
        self.redis_reconnects = Counter(
            "bots_redis_reconnects", "Times the Redis subscription came back", registry=r
        )

    def count_received(self, channel: str) -> None:
        self.received.labels(channel if channel in KNOWN_CHANNELS else "other").inc()
