"""Live documents: one pycrdt Doc and Awareness per document that has at
least one authenticated client, y-protocols sync against it, awareness relay,
and fan-out of every change.

A broadcast frame is encoded once per distinct address (with no session
awareness every peer shares the document name, so once per change) and the
same bytes object is handed to every peer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pycrdt import Awareness, Doc, get_state

from . import protocol as p
from .metrics import CollabMetrics
from .store import Debounce, DraftStore

log = logging.getLogger("channels.collab.documents")

# Awareness client ids one peer may introduce: a provider has one (its
# Y.Doc's client id); a few more allow a provider recreated on one socket.
MAX_AWARENESS_CLIENTS_PER_PEER = 8
# As y-protocols: a client whose awareness was not renewed for this long is gone.
AWARENESS_OUTDATED_MS = 30_000


class BadUpdate(ValueError):
    """A Yjs payload that cannot be decoded or applied."""


class Peer(Protocol):
    """One authenticated (socket, document) pair."""

    address: str
    readonly: bool

    def send(self, frame: bytes) -> None: ...


def _crdt_call(fn: Callable, *args):
    """Run a pycrdt call on untrusted bytes. yrs reports bad input as
    ValueError; a Rust panic surfaces as pyo3's PanicException, a
    BaseException, which must not take the process down either."""
    try:
        return fn(*args)
    except Exception as exc:
        raise BadUpdate(str(exc)[:200]) from exc
    except BaseException as exc:
        if type(exc).__name__ == "PanicException":
            raise BadUpdate("pycrdt panicked on input") from exc
        raise


class LiveDocument:
    __slots__ = ("_outbox", "_subs", "awareness", "debounce", "name", "peers", "timer", "ydoc")

    def __init__(self, name: str, debounce: Debounce):
        self.name = name
        self.ydoc = Doc()
        self.awareness = Awareness(self.ydoc)
        # The server is not an editor: it has no presence of its own.
        self.awareness.set_local_state(None)
        self.peers: dict[Peer, set[int]] = {}
        self.debounce = debounce
        self.timer: Any = None
        self._outbox: list[bytes] = []
        self._subs: list = []

    def state(self) -> bytes:
        return self.ydoc.get_update()


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
    ):
        self.store = store
        self.debounce_seconds = debounce_seconds
        self.max_debounce_seconds = max_debounce_seconds
        self.metrics = metrics
        self._call_later = call_later
        self.clock = clock
        self.docs: dict[str, LiveDocument] = {}

    # ------------------------------------------------------------ lifecycle

    def open(self, name: str, peer: Peer) -> LiveDocument:
        doc = self.docs.get(name)
        if doc is None:
            doc = self._load(name)
        doc.peers[peer] = set()
        if doc.awareness.states:
            # As Hocuspocus: a new peer learns who is already there at once.
            clients = list(doc.awareness.states)
            peer.send(p.encode_awareness(peer.address, doc.awareness.encode_awareness_update(clients)))
        return doc

    def _load(self, name: str) -> LiveDocument:
        doc = LiveDocument(name, Debounce(self.debounce_seconds, self.max_debounce_seconds))
        draft = self.store.get(name)
        if draft is not None:
            try:
                doc.ydoc.apply_update(draft)
            except Exception:  # our own encoding; never expected
                log.exception("stored draft could not be applied; starting empty", extra={"document": name})
        doc._subs.append(doc.ydoc.observe(lambda event: doc._outbox.append(event.update)))
        doc.awareness.observe(lambda topic, change: self._on_awareness(doc, topic, change))
        self.docs[name] = doc
        log.debug("document loaded", extra={"document": name, "from_draft": draft is not None})
        return doc

    def leave(self, doc: LiveDocument, peer: Peer) -> None:
        clients = doc.peers.pop(peer, None)
        if clients is None:
            return
        if clients:
            # Tell the remaining peers this client's cursor is gone.
            doc.awareness.remove_awareness_states(list(clients), None)
        if not doc.peers:
            self._save(doc)
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
        log.debug("document unloaded", extra={"document": doc.name})

    def save_all(self) -> int:
        for doc in list(self.docs.values()):
            self._save(doc)
        return len(self.docs)

    def _save(self, doc: LiveDocument) -> None:
        self.store.put(doc.name, doc.state())
        doc.debounce.stored()
        if doc.timer is not None:
            doc.timer.cancel()
            doc.timer = None
        if self.metrics:
            self.metrics.drafts_saved.inc()

    def _changed(self, doc: LiveDocument) -> None:
        deadline = doc.debounce.changed(self.clock())
        if doc.timer is None and self._call_later is not None:
            doc.timer = self._call_later(max(0.0, deadline - self.clock()), lambda: self._timer_fired(doc))

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
            diff = _crdt_call(doc.ydoc.get_update, msg.payload)
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
        self.apply(doc, msg.payload, origin=peer)
        peer.send(p.encode_sync_status(address, True))

    def apply(self, doc: LiveDocument, update: bytes, origin: Peer | None = None) -> None:
        if update == p.EMPTY_UPDATE:
            return
        doc._outbox.clear()
        _crdt_call(doc.ydoc.apply_update, update)
        if not doc._outbox:
            return  # a duplicate, or structs waiting for missing ones
        emitted = doc._outbox[:]
        doc._outbox.clear()
        for change in emitted:
            # The origin already has it; every other peer gets the same bytes.
            self._broadcast(doc, lambda address, u=change: p.encode_update(address, u), exclude=origin)
        self._changed(doc)

    @staticmethod
    def _adds_nothing(doc: LiveDocument, update: bytes) -> bool:
        if update == p.EMPTY_UPDATE:
            return True
        incoming = p.decode_state_vector(_crdt_call(get_state, update))
        local = p.decode_state_vector(doc.ydoc.get_state())
        return all(local.get(client, 0) >= clock for client, clock in incoming.items())

    # ------------------------------------------------------------ awareness

    def awareness(self, doc: LiveDocument, peer: Peer, update: bytes) -> bool:
        """Apply a peer's awareness update; False when it is refused."""
        entries = p.decode_awareness_update(update)  # ProtocolError propagates
        known = doc.peers.get(peer)
        if known is None:
            return False
        states = doc.awareness.states
        new = {e.client_id for e in entries if e.state is not None and e.client_id not in states}
        if len(known | new) > MAX_AWARENESS_CLIENTS_PER_PEER:
            log.warning(
                "awareness update refused: too many clients for one peer",
                extra={"document": doc.name, "clients": len(known | new)},
            )
            return False
        doc.awareness.apply_awareness_update(update, peer)
        return True

    def _on_awareness(self, doc: LiveDocument, topic: str, change: tuple) -> None:
        if topic != "update":
            return
        changes, origin = change
        added, updated, removed = changes["added"], changes["updated"], changes["removed"]
        clients = doc.peers.get(origin) if origin is not None else None
        if clients is not None:
            clients.update(added)
            clients.difference_update(removed)
        changed = added + updated + removed
        if not changed or not doc.peers:
            return
        payload = doc.awareness.encode_awareness_update(changed)
        # Sent to the origin too: providers count it as a sign of life.
        self._broadcast(doc, lambda address: p.encode_awareness(address, payload))

    def stateless(self, doc: LiveDocument, peer: Peer, payload: str) -> None:
        self._broadcast(doc, lambda address: p.encode_stateless(address, payload), exclude=peer)

    def query_awareness(self, doc: LiveDocument, peer: Peer) -> None:
        clients = list(doc.awareness.states)
        payload = doc.awareness.encode_awareness_update(clients)
        peer.send(p.encode_awareness(peer.address, payload))

    def expire_awareness(self, now_ms: float | None = None, docs: Iterable[LiveDocument] | None = None) -> int:
        """Remove clients whose awareness was not renewed in time (their
        provider vanished without a word), as y-protocols does; in `docs`
        only, when given (a sweep takes them a batch at a time)."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        removed = 0
        for doc in list(self.docs.values()) if docs is None else docs:
            meta = doc.awareness.meta
            stale = [
                client for client in doc.awareness.states
                if now_ms - meta.get(client, {}).get("lastUpdated", now_ms) >= AWARENESS_OUTDATED_MS
            ]
            if stale:
                doc.awareness.remove_awareness_states(stale, "timeout")
                removed += len(stale)
        return removed

    # ------------------------------------------------------------ fan-out

    def _broadcast(self, doc: LiveDocument, encode: Callable[[str], bytes], exclude: Peer | None = None) -> None:
        cached_address = None
        frame = b""
        for peer in list(doc.peers):
            if peer is exclude:
                continue
            if peer.address != cached_address:
                cached_address = peer.address
                frame = encode(cached_address)
            peer.send(frame)
