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
        # "Posted": each message this instance posted (a repeat the homeserver
        # absorbed by its transaction id counts where it was first posted too).
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
        self.pending = Gauge(
            "bots_pending_messages", "Messages kept until seen done: queued, in flight, or copies for a takeover",
            registry=r,
        )
        self.pending_bytes = Gauge("bots_pending_bytes", "Payload bytes of the messages kept", registry=r)
        self.pending_oldest = Gauge(
            "bots_pending_oldest_seconds", "Age of the oldest message kept (0 when none)", registry=r
        )
        # Exactly once across instances (claims.py, docs/bots.md).
        self.claimed = Counter(
            "bots_messages_claimed", "Messages this instance started posting under its claim on their room",
            registry=r,
        )
        self.taken_over = Counter(
            "bots_messages_taken_over",
            "Of those, messages of a room taken over from an instance whose lease expired", registry=r,
        )
        self.deduplicated = Counter(
            "bots_messages_deduplicated", "Identical publishes within the dedupe window, counted as one",
            registry=r,
        )
        self.given_up = Counter(
            "bots_messages_given_up",
            "Messages this instance stopped keeping before they were done, by cause: a keep bound "
            "(count, bytes, age), lost (no live instance held them), shutdown", ["reason"], registry=r,
        )
        self.redis_reconnects = Counter(
            "bots_redis_reconnects", "Times the Redis subscription came back", registry=r
        )

    def count_received(self, channel: str) -> None:
        self.received.labels(channel if channel in KNOWN_CHANNELS else "other").inc()
