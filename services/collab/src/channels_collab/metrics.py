"""Prometheus metrics of the collab service, in one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

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
        self.stored_drafts = Gauge("collab_stored_drafts", "Drafts held in the ephemeral store", registry=r)
        self.auth = Counter(
            "collab_auth_total",
            "Document auth decisions: result (allowed, denied, refused_name) and cause (allowed, rails_denied, "
            "rails_timeout, rails_unreachable, refused_name, invalid_token, error)",
            ["result", "cause"],
            registry=r,
        )
        self.frames = Counter("collab_frames_total", "Frames received, by message type", ["type"], registry=r)
        self.closes = Counter("collab_closes_total", "Sockets closed by the server, by close code", ["code"], registry=r)
        self.drafts_saved = Counter("collab_drafts_saved_total", "Document states written to the store", registry=r)
        self.drafts_evicted = Counter(
            "collab_drafts_evicted_total", "Drafts dropped by the count or idle-age bound", registry=r
        )
        self.throttled = Counter(
            "collab_throttled_total", "Connection attempts refused with 429 by the attempt throttle", registry=r
        )
        # Label children resolved once: the frame counter is on the hot path.
        self._frame_children = {name: self.frames.labels(name) for name in FRAME_TYPES}
        self._unknown_frames = self._frame_children["unknown"]

    def frame(self, kind: str) -> None:
        self._frame_children.get(kind, self._unknown_frames).inc()

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
