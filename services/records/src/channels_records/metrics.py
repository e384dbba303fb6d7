"""The records service's Prometheus metrics, in their own registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily


class HotCounters:
    """Counters bumped once per relayed message. prometheus_client takes a
    lock and a few calls per increment; these are plain integers, read only
    when /metrics is scraped (see HotCollector)."""

    __slots__ = ("deliveries", "direct", "relayed")

    def __init__(self) -> None:
        self.deliveries = 0
        self.direct = 0
        self.relayed: dict[str, int] = {}

    def relayed_one(self, event: str) -> None:
        self.relayed[event] = self.relayed.get(event, 0) + 1


class HotCollector:
    def __init__(self, counters: HotCounters):
        self.counters = counters

    def collect(self):
        c = self.counters
        relayed = CounterMetricFamily("records_messages_relayed", "Redis messages relayed", labels=["event"])
        for event, value in sorted(c.relayed.items()):
            relayed.add_metric([event], value)
        yield relayed
        yield CounterMetricFamily("records_deliveries", "Event packets queued to sockets", value=c.deliveries)
        yield CounterMetricFamily(
            "records_direct_deliveries",
            "Event packets written straight to a websocket's transport (the rest were queued)",
            value=c.direct,
        )


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connected = Gauge("records_connected_sockets", "Connected Socket.IO sockets", registry=r)
        self.hot = HotCounters()
        r.register(HotCollector(self.hot))
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
        self.heads_closed = Counter(
            "records_http_heads_closed",
            "Connections closed in their request head: too slow (deadline) or too many at once (bound)",
            ["cause"], registry=r,
        )
        self.recoveries = Counter(
            "records_recoveries", "Connection state recovery attempts", ["result"], registry=r
        )
