"""Awareness of the live documents: each peer's own clients (bounded), the
relay to local peers and other instances, and expiry of silent clients.

Each instance expires what it stops hearing; only news from here travels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import protocol as p
from .live import LiveDocument, Peer, broadcast

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("channels.collab.documents")

# Awareness client ids one peer may introduce: a provider has one (its
# Y.Doc's client id); a few more allow a provider recreated on one socket.
MAX_AWARENESS_CLIENTS_PER_PEER = 8
# As y-protocols: a client whose awareness was not renewed for this long is gone.
AWARENESS_OUTDATED_MS = 30_000
# Origin of awareness changes that came from another instance.
REMOTE = "remote"


class AwarenessRelay:
    def __init__(self, history: Cluster | None):
        self.history = history

    def observe(self, doc: LiveDocument) -> None:
        doc.awareness.observe(lambda topic, change: self._on_change(doc, topic, change))

    def greet(self, doc: LiveDocument, peer: Peer) -> None:
        """As Hocuspocus: a new peer learns who is already there at once."""
        if doc.awareness.states:
            clients = list(doc.awareness.states)
            peer.send(p.encode_awareness(peer.address, doc.awareness.encode_awareness_update(clients)))

    def forget(self, doc: LiveDocument, clients: tuple[int, ...]) -> None:
        """Tell the remaining peers (here and elsewhere) these clients are gone."""
        if clients:
            doc.awareness.remove_awareness_states(list(clients), None)

    def apply(self, doc: LiveDocument, peer: Peer, update: bytes) -> bool:
        """Apply a peer's awareness update; False when it is refused."""
        entries = p.decode_awareness_update(update)  # HocuspocusProtocolError propagates
        known = doc.peers.get(peer)
        if known is None:
            return False
        states = doc.awareness.states
        new = {e.client_id for e in entries if e.state is not None and e.client_id not in states}
        clients = len(new.union(known))
        if clients > MAX_AWARENESS_CLIENTS_PER_PEER:
            log.warning(
                "awareness update refused: too many clients for one peer",
                extra={"document": doc.name, "clients": clients},
            )
            return False
        doc.awareness.apply_awareness_update(update, peer)
        return True

    def apply_remote(self, doc: LiveDocument, update: bytes) -> None:
        try:
            p.decode_awareness_update(update)
            doc.awareness.apply_awareness_update(update, REMOTE)
        except (p.HocuspocusProtocolError, ValueError) as exc:  # hostile bytes from Redis
            log.warning("awareness update from redis could not be applied; skipped",
                        extra={"document": doc.name, "error": str(exc)[:200]})

    def answer_query(self, doc: LiveDocument) -> None:
        """Another instance asks who is here: publish this instance's clients."""
        local = set().union(*doc.peers.values()) if doc.peers else set()
        local &= set(doc.awareness.states)
        if local and self.history is not None:
            self.history.publish_awareness(doc.name, doc.awareness.encode_awareness_update(list(local)))

    def query(self, doc: LiveDocument, peer: Peer) -> None:
        clients = list(doc.awareness.states)
        payload = doc.awareness.encode_awareness_update(clients)
        peer.send(p.encode_awareness(peer.address, payload))

    def _on_change(self, doc: LiveDocument, topic: str, change: tuple) -> None:
        if topic != "update":
            return
        changes, origin = change
        added, updated, removed = changes["added"], changes["updated"], changes["removed"]
        clients = doc.peers.get(origin) if origin is not None else None
        if clients is not None and (added or removed):
            doc.peers[origin] = tuple(set(clients).union(added).difference(removed))
        changed = added + updated + removed
        if not changed:
            return
        payload = doc.awareness.encode_awareness_update(changed)
        if self.history is not None and origin != REMOTE and origin != "timeout":
            # Each instance expires what it stops hearing; only news from here travels.
            self.history.publish_awareness(doc.name, payload)
        if not doc.peers:
            return
        # Sent to the origin too: providers count it as a sign of life.
        broadcast(doc, p.encode_awareness, payload)

    @staticmethod
    def expire(docs: Iterable[LiveDocument], now_ms: float | None = None) -> int:
        """Remove clients whose awareness was not renewed in time (their
        provider vanished without a word), as y-protocols does."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        removed = 0
        for doc in docs:
            meta = doc.awareness.meta
            stale = [
                client for client in doc.awareness.states
                if now_ms - meta.get(client, {}).get("lastUpdated", now_ms) >= AWARENESS_OUTDATED_MS
            ]
            if stale:
                doc.awareness.remove_awareness_states(stale, "timeout")
                removed += len(stale)
        return removed
