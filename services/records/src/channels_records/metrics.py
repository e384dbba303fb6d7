"""The records service's Prometheus metrics, in their own registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connected = Gauge("records_connected_sockets", "Connected Socket.IO sockets", registry=r)
        self.relayed = Counter(
            "records_messages_relayed", "Redis messages relayed", ["event"], registry=r
        )
        self.deliveries = Counter(
            "records_deliveries", "Event packets queued to sockets", registry=r
        )
        self.direct = Counter(
            "records_direct_deliveries",
            "Event packets written straight to a websocket's transport (the rest were queued)",
            registry=r,
        )
        self.dropped = Counter(
            "records_messages_dropped", "Redis messages dropped", ["reason"], registry=r
        )
        self.redis_reconnects = Counter(
            "records_redis_reconnects", "Times the Redis subscription came back", registry=r
        )
        self.slow_clients = Counter(
            "records_slow_client_disconnects",
            "Sockets disconnected for exceeding their send buffer",
            registry=r,
        )
        self.lookup_retries = Counter(
            "records_room_lookups_deferred",
            "Connections whose token lookup waited for Redis in the background",
            registry=r,
        )
        self.recoveries = Counter(
            "records_recoveries", "Connection state recovery attempts", ["result"], registry=r
        )
