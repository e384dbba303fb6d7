"""Live documents: one pycrdt Doc and Awareness per document that has at
least one authenticated client, y-protocols sync against it, awareness relay,
and fan-out of every change.

With a `history` (the cluster, Redis) a document is loaded from Redis before
its first client syncs, every client update is appended there and
acknowledged only once appended, updates and awareness from other instances
are applied here, and the debounced store is a compaction. Without one (unit
tests) drafts go to the in-process `DraftStore` and acks are immediate.
Awareness is `AwarenessRelay`'s; a document and its fan-out are in `live`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from channels_common.tasks import spawn
from pycrdt import get_state
from redis.exceptions import RedisError

from . import protocol as p
from .awareness import AwarenessRelay
from .cluster import Cluster
from .live import NO_CLIENTS, BadUpdate, LiveDocument, Peer, broadcast, crdt_call
from .metrics import CollabMetrics
from .snapshot import Loaded
from .store import Debounce, DraftStore

__all__ = ["BadUpdate", "DocumentRegistry", "LiveDocument", "Peer"]

log = logging.getLogger("channels.collab.documents")

# How long a load from Redis may take before the document opens without it
# (degraded: it is merged in when Redis answers).
LOAD_TIMEOUT_SECONDS = 3.0
# A loaded document nobody opened (its client left during the load) goes after this.
UNUSED_DOCUMENT_SECONDS = 10.0


class DocumentRegistry:
    def __init__(
        self,
        store: DraftStore,
        *,
        debounce_seconds: float,
        max_debounce_seconds: float,
        metrics: CollabMetrics | None = None,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        history: Cluster | None = None,
    ):
        self.store = store
        self.history = history
        self._loading: dict[str, asyncio.Future] = {}
        self._paused: set[Peer] = set()
        if history is not None:
            history.listener = self
        self.debounce_seconds = debounce_seconds
        self.max_debounce_seconds = max_debounce_seconds
        self.metrics = metrics
        self._call_later = call_later
        self.clock = clock
        self.docs: dict[str, LiveDocument] = {}
        self.presence = AwarenessRelay(history)

    # ------------------------------------------------------------ lifecycle

    async def prepare(self, name: str) -> None:
        """Load `name` from Redis unless it is live here already; concurrent
        callers share one load. Returns once `open` finds it loaded."""
        if self.history is None or name in self.docs:
            return
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = spawn(self._load_remote(name), name="collab-load")
        await asyncio.shield(loading)

    async def _load_remote(self, name: str) -> None:
        history = self.history
        loaded = None
        try:
            if not history.ever_failed or history.healthy:
                loaded = await asyncio.wait_for(history.load(name), LOAD_TIMEOUT_SECONDS)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("document not loaded from redis; opening it without (merged later)",
                        extra={"document": name, "error": str(exc)[:200]})
        finally:
            self._loading.pop(name, None)
        if name in self.docs:
            return
        doc = self._load(name, loaded)
        if loaded is not None and loaded.updates:
            self._changed(doc)  # its log has history to compact

    def open(self, name: str, peer: Peer) -> LiveDocument:
        doc = self.docs.get(name)
        if doc is None:
            doc = self._load(name, None)
        doc.peers[peer] = NO_CLIENTS
        if self.history is not None and self.history.backpressured and self.history.pending_updates(name):
            self._pause(peer)
        self.presence.greet(doc, peer)
        return doc

    def _load(self, name: str, loaded: Loaded | None) -> LiveDocument:
        doc = LiveDocument(name, Debounce(self.debounce_seconds, self.max_debounce_seconds))
        if self.history is None:
            draft = self.store.get(name)
            if draft is not None:
                try:
                    doc.ydoc.apply_update(draft)
                except Exception:  # our own encoding; never expected
                    log.exception("stored draft could not be applied; starting empty", extra={"document": name})
        else:
            if loaded is not None:
                self._merge(doc, loaded)
            self.history.track(name, loaded)
            if loaded is not None:
                # The instances already there tell us who is present.
                self.history.publish_awareness(name, b"", kind=b"q")
        doc._subs.append(doc.ydoc.observe(doc.collect))
        self.presence.observe(doc)
        self.docs[name] = doc
        log.debug("document loaded", extra={"document": name, "from_redis": loaded is not None})
        return doc

    def _merge(self, doc: LiveDocument, loaded: Loaded) -> None:
        """Apply what Redis holds (hostile until applied: a bad entry is
        logged and skipped) and this instance's updates not yet appended."""
        parts = ([loaded.state] if loaded.state else []) + loaded.updates + self.history.pending_updates(doc.name)
        for update in parts:
            try:
                self.apply(doc, update)
            except BadUpdate as exc:
                log.warning("update from redis could not be applied; skipped",
                            extra={"document": doc.name, "error": str(exc)})

    def leave(self, doc: LiveDocument, peer: Peer) -> None:
        clients = doc.peers.pop(peer, None)
        if peer in self._paused:
            self._paused.discard(peer)
            peer.resume("unacked")
        if clients is None:
            return
        self.presence.forget(doc, clients)
        if not doc.peers:
            self._save(doc, leaving=True)
            self._unload(doc)

    def _unload(self, doc: LiveDocument) -> None:
        if doc.timer is not None:
            doc.timer.cancel()
            doc.timer = None
        for sub in doc._subs:
            doc.ydoc.unobserve(sub)
        doc._subs.clear()
        if self.docs.get(doc.name) is doc:
            del self.docs[doc.name]
            if self.history is not None:
                self.history.untrack(doc.name)
        log.debug("document unloaded", extra={"document": doc.name})

    def unload_unused(self, now: float | None = None) -> int:
        """Unload documents loaded for a client that left before opening them."""
        now = time.monotonic() if now is None else now
        unused = [d for d in self.docs.values() if not d.peers and now - d.unused_since > UNUSED_DOCUMENT_SECONDS]
        for doc in unused:
            self._save(doc, leaving=True)
            self._unload(doc)
        return len(unused)

    def save_all(self) -> int:
        for doc in list(self.docs.values()):
            self._save(doc, leaving=True)
        return len(self.docs)

    def _save(self, doc: LiveDocument, leaving: bool = False) -> None:
        doc.debounce.stored()
        if doc.timer is not None:
            doc.timer.cancel()
            doc.timer = None
        if self.history is not None:
            self.history.compact(doc.name, lambda: doc.state() if self.docs.get(doc.name) is doc or leaving else None,
                                 lease=not leaving)
            return
        self.store.put(doc.name, doc.state())
        if self.metrics:
            self.metrics.drafts_saved.inc()

    def _changed(self, doc: LiveDocument) -> None:
        now = self.clock()
        deadline = doc.debounce.changed(now)
        if doc.timer is None and self._call_later is not None:
            doc.timer = self._call_later(max(0.0, deadline - now), lambda: self._timer_fired(doc))

    def _timer_fired(self, doc: LiveDocument) -> None:
        doc.timer = None
        if self.docs.get(doc.name) is not doc:
            return
        now = self.clock()
        if doc.debounce.due(now):
            self._save(doc)
        elif doc.debounce.pending and self._call_later is not None:
            # Edits moved the deadline since the timer was set.
            doc.timer = self._call_later(max(0.0, doc.debounce.deadline - now), lambda: self._timer_fired(doc))

    # ----------------------------------------------------------------- sync

    def sync(self, doc: LiveDocument, peer: Peer, msg: p.Sync) -> None:
        address = peer.address
        if msg.step == p.SyncStep.STEP1:
            diff = crdt_call(doc.ydoc.get_update, msg.payload)
            peer.send(p.encode_sync_step2(address, diff))
            if not msg.reply:
                peer.send(p.encode_sync_step1(address, doc.ydoc.get_state()))
            return
        if peer.readonly:
            # Never applied. A SyncStep2 that brings nothing new is still
            # acknowledged, as Hocuspocus does, so the provider counts it synced.
            applied = msg.step == p.SyncStep.STEP2 and self._adds_nothing(doc, msg.payload)
            peer.send(p.encode_sync_status(address, applied))
            return
        changed = self.apply(doc, msg.payload, origin=peer)
        history = self.history
        if history is None:
            peer.send(p.encode_sync_status(address, True))
            return
        # Appended as the client sent it when it changed anything (or waits
        # here for missing structs); else the ack only waits for the appends
        # before it, which may hold what this update repeats.
        record = changed or (msg.payload != p.EMPTY_UPDATE and not self._adds_nothing(doc, msg.payload))
        history.append(doc.name, msg.payload if record else None, partial(peer.send, p.encode_sync_status(address, True)))
        if history.backpressured and peer not in self._paused:
            self._pause(peer)

    def apply(self, doc: LiveDocument, update: bytes, origin: Peer | None = None) -> bool:
        """Apply and fan out `update`; True when it changed the document."""
        if update == p.EMPTY_UPDATE:
            return False
        outbox = doc._outbox
        outbox.clear()
        crdt_call(doc.ydoc.apply_update, update)
        if not outbox:
            return False  # a duplicate, or structs waiting for missing ones
        emitted = outbox[:]
        outbox.clear()
        for change in emitted:
            # The origin already has it; every other peer gets the same bytes.
            broadcast(doc, p.encode_update, change, exclude=origin)
        self._changed(doc)
        return True

    # ------------------------------------------------ from other instances

    def remote_updates(self, name: str, updates: list[bytes]) -> None:
        doc = self.docs.get(name)
        if doc is None:
            return
        for update in updates:
            try:
                self.apply(doc, update)
            except BadUpdate as exc:
                log.warning("update from redis could not be applied; skipped",
                            extra={"document": name, "error": str(exc)})

    def reload(self, name: str, loaded: Loaded) -> None:
        doc = self.docs.get(name)
        if doc is not None:
            self._merge(doc, loaded)
            # Redis may have lost data: the next compaction writes all of it back.
            self._changed(doc)

    def remote_awareness(self, name: str, update: bytes) -> None:
        doc = self.docs.get(name)
        if doc is not None:
            self.presence.apply_remote(doc, update)

    def awareness_query(self, name: str) -> None:
        doc = self.docs.get(name)
        if doc is not None:
            self.presence.answer_query(doc)

    def backpressure(self, on: bool, names) -> None:
        if on:
            for name in names:
                doc = self.docs.get(name)
                for peer in list(doc.peers) if doc else ():
                    self._pause(peer)
        else:
            paused, self._paused = self._paused, set()
            for peer in paused:
                peer.resume("unacked")

    def _pause(self, peer: Peer) -> None:
        self._paused.add(peer)
        peer.pause("unacked")

    @staticmethod
    def _adds_nothing(doc: LiveDocument, update: bytes) -> bool:
        if update == p.EMPTY_UPDATE:
            return True
        incoming = p.decode_state_vector(crdt_call(get_state, update))
        local = p.decode_state_vector(doc.ydoc.get_state())
        return all(local.get(client, 0) >= clock for client, clock in incoming.items())

    # ------------------------------------------------------------ awareness

    def awareness(self, doc: LiveDocument, peer: Peer, update: bytes) -> bool:
        """Apply a peer's awareness update; False when it is refused."""
        return self.presence.apply(doc, peer, update)

    def stateless(self, doc: LiveDocument, peer: Peer, payload: str) -> None:
        broadcast(doc, p.encode_stateless, payload, exclude=peer)

    def query_awareness(self, doc: LiveDocument, peer: Peer) -> None:
        self.presence.query(doc, peer)

    def expire_awareness(self, now_ms: float | None = None, docs: Iterable[LiveDocument] | None = None) -> int:
        """Remove clients whose awareness was not renewed in time; in `docs`
        only, when given (a sweep takes them a batch at a time)."""
        return self.presence.expire(list(self.docs.values()) if docs is None else docs, now_ms)
