"""Prometheus metrics of the collab service, in one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .protocol import MessageType
from .rails import ALLOWED, ERROR, RAILS_TIMEOUT, Decision

REFUSED_NAME = "refused_name"

FRAME_TYPES = [t.name.lower() for t in MessageType] + ["connection_ping", "connection_pong", "unknown"]


class CollabMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.open_sockets = Gauge("collab_open_sockets", "WebSockets open", registry=r)
        self.loaded_documents = Gauge("collab_loaded_documents", "Documents live in memory", registry=r)
        self.stored_drafts = Gauge(
            "collab_stored_drafts", "Documents whose draft this instance wrote to Redis, within the draft TTL",
            registry=r,
        )
        self.rails_calls = Gauge("collab_rails_calls", "Auth calls to Rails in flight", registry=r)
        self.rails_waiting = Gauge(
            "collab_rails_calls_waiting", "Auth calls waiting for their socket's turn at Rails' clients", registry=r,
        )
        self.auth = Counter(
            "collab_auth_total",
            "Document auth decisions: result (allowed, denied, refused_name) and cause (allowed, rails_denied, "
            "rails_timeout, rails_unreachable, refused_name, invalid_token, error)",
            ["result", "cause"],
            registry=r,
        )
        self.frames = _FrameCounts()
        r.register(self.frames)
        self.closes = Counter("collab_closes_total", "Sockets closed by the server, by close code", ["code"], registry=r)
        self.drafts_saved = Counter(
            "collab_drafts_saved_total", "Document snapshots written to Redis (compactions that moved it)", registry=r
        )
        # Cluster: the document's history in Redis.
        self.updates_appended = Counter(
            "collab_updates_appended_total", "Client updates appended to the documents' Redis streams", registry=r
        )
        self.unacked_updates = Gauge(
            "collab_unacked_updates", "Client updates applied here and not yet in Redis (not acknowledged)", registry=r
        )
        self.unacked_bytes = Gauge("collab_unacked_bytes", "Bytes of those updates", registry=r)
        self.receive_lag = Histogram(
            "collab_receive_lag_seconds", "From another instance's append to its update being applied here",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.gap_reloads = Counter(
            "collab_gap_reloads_total", "Documents reloaded because this instance fell behind the trimmed history",
            registry=r,
        )
        self.compactions = Counter(
            "collab_compactions_total", "Compaction attempts (written, stale, leased_elsewhere, failed)", ["result"],
            registry=r,
        )
        self.documents_loaded = Counter(
            "collab_documents_loaded_total", "Document loads from Redis (snapshot and log tail)", registry=r
        )
        self.redis_up = Gauge("collab_redis_up", "1 while appends and the reader work", registry=r)
        self.heads_closed = Counter(
            "collab_http_heads_closed",
            "Connections closed in their request head: too slow (deadline) or too many at once (bound)",
            ["cause"], registry=r,
        )
        self.throttled = Counter(
            "collab_throttled_total", "Connection attempts refused with 429 by the attempt throttle", registry=r
        )
    def frame(self, kind: str) -> None:
        counts = self.frames.counts
        if kind in counts:
            counts[kind] += 1
        else:
            counts["unknown"] += 1

    def auth_decided(self, decision: Decision) -> None:
        cause = decision.cause or (ALLOWED if decision.allowed else ERROR)
        self.auth.labels("allowed" if decision.allowed else "denied", cause).inc()

    def auth_timed_out(self) -> None:
        """Rails had not answered when the socket's deadline came."""
        self.auth.labels("denied", RAILS_TIMEOUT).inc()

    def auth_refused_name(self) -> None:
        self.auth.labels(REFUSED_NAME, REFUSED_NAME).inc()

    def closed(self, code: int) -> None:
        self.closes.labels(str(code)).inc()


class _FrameCounts(Collector):
    """collab_frames_total{type}: plain integers, read when scraped. Every
    received frame counts one; a prometheus Counter's lock and float add
    cost more than the rest of a small frame's bookkeeping."""

    def __init__(self):
        self.counts = dict.fromkeys(FRAME_TYPES, 0)

    def collect(self):
        family = CounterMetricFamily("collab_frames", "Frames received, by message type", labels=["type"])
        for kind, count in self.counts.items():
            family.add_metric([kind], count)
        yield family
