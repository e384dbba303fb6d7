"""Live documents: one pycrdt Doc and Awareness per document that has at
least one authenticated client, y-protocols sync against it, awareness relay,
and fan-out of every change.

With a `history` (the cluster, Redis) a document is loaded from Redis before
its first client syncs, every client update is appended there and
acknowledged only once appended, updates and awareness from other instances
are applied here, and the debounced store is a compaction. Without one (unit
tests) drafts go to the in-process `DraftStore` and acks are immediate.

A broadcast frame is encoded once per distinct address (with no session
awareness every peer shares the document name, so once per change) and the
same bytes object is handed to every peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from channels_common.tasks import spawn
from pycrdt import Awareness, Doc, get_state
from redis.exceptions import RedisError

from . import protocol as p
from .cluster import Cluster
from .metrics import CollabMetrics
from .snapshot import Loaded
from .store import Debounce, DraftStore

log = logging.getLogger("channels.collab.documents")

# Awareness client ids one peer may introduce: a provider has one (its
# Y.Doc's client id); a few more allow a provider recreated on one socket.
MAX_AWARENESS_CLIENTS_PER_PEER = 8
# As y-protocols: a client whose awareness was not renewed for this long is gone.
AWARENESS_OUTDATED_MS = 30_000
# How long a load from Redis may take before the document opens without it
# (degraded: it is merged in when Redis answers).
LOAD_TIMEOUT_SECONDS = 3.0
# A loaded document nobody opened (its client left during the load) goes after this.
UNUSED_DOCUMENT_SECONDS = 10.0
# Origin of awareness changes that came from another instance.
REMOTE = "remote"


class BadUpdate(ValueError):
    """A Yjs payload that cannot be decoded or applied."""


class Peer(Protocol):
    """One authenticated (socket, document) pair."""

    address: str
    readonly: bool

    def send(self, frame: bytes) -> None: ...

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...


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
    __slots__ = ("_outbox", "_subs", "awareness", "debounce", "name", "peers", "timer", "unused_since", "ydoc")

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
        self.unused_since = time.monotonic()

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
        doc.peers[peer] = set()
        if self.history is not None and self.history.backpressured and self.history.pending_updates(name):
            self._pause(peer)
        if doc.awareness.states:
            # As Hocuspocus: a new peer learns who is already there at once.
            clients = list(doc.awareness.states)
            peer.send(p.encode_awareness(peer.address, doc.awareness.encode_awareness_update(clients)))
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
        doc._subs.append(doc.ydoc.observe(lambda event: doc._outbox.append(event.update)))
        doc.awareness.observe(lambda topic, change: self._on_awareness(doc, topic, change))
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
        if clients:
            # Tell the remaining peers (here and elsewhere) this client's cursor is gone.
            doc.awareness.remove_awareness_states(list(clients), None)
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
        changed = self.apply(doc, msg.payload, origin=peer)
        history = self.history
        if history is None:
            peer.send(p.encode_sync_status(address, True))
            return
        # Appended as the client sent it when it changed anything (or waits
        # here for missing structs); else the ack only waits for the appends
        # before it, which may hold what this update repeats.
        record = changed or (msg.payload != p.EMPTY_UPDATE and not self._adds_nothing(doc, msg.payload))
        history.append(doc.name, msg.payload if record else None,
                       lambda: peer.send(p.encode_sync_status(address, True)))
        if history.backpressured and peer not in self._paused:
            self._pause(peer)

    def apply(self, doc: LiveDocument, update: bytes, origin: Peer | None = None) -> bool:
        """Apply and fan out `update`; True when it changed the document."""
        if update == p.EMPTY_UPDATE:
            return False
        doc._outbox.clear()
        _crdt_call(doc.ydoc.apply_update, update)
        if not doc._outbox:
            return False  # a duplicate, or structs waiting for missing ones
        emitted = doc._outbox[:]
        doc._outbox.clear()
        for change in emitted:
            # The origin already has it; every other peer gets the same bytes.
            self._broadcast(doc, lambda address, u=change: p.encode_update(address, u), exclude=origin)
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
            self._apply_remote_awareness(doc, update)

    def _apply_remote_awareness(self, doc: LiveDocument, update: bytes) -> None:
        try:
            p.decode_awareness_update(update)
            doc.awareness.apply_awareness_update(update, REMOTE)
        except (p.HocuspocusProtocolError, ValueError) as exc:  # hostile bytes from Redis
            log.warning("awareness update from redis could not be applied; skipped",
                        extra={"document": doc.name, "error": str(exc)[:200]})

    def awareness_query(self, name: str) -> None:
        doc = self.docs.get(name)
        if doc is None:
            return
        local = set().union(*doc.peers.values()) if doc.peers else set()
        local &= set(doc.awareness.states)
        if local:
            self.history.publish_awareness(name, doc.awareness.encode_awareness_update(list(local)))

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
        incoming = p.decode_state_vector(_crdt_call(get_state, update))
        local = p.decode_state_vector(doc.ydoc.get_state())
        return all(local.get(client, 0) >= clock for client, clock in incoming.items())

    # ------------------------------------------------------------ awareness

    def awareness(self, doc: LiveDocument, peer: Peer, update: bytes) -> bool:
        """Apply a peer's awareness update; False when it is refused."""
        entries = p.decode_awareness_update(update)  # HocuspocusProtocolError propagates
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
        if not changed:
            return
        payload = doc.awareness.encode_awareness_update(changed)
        if self.history is not None and origin != REMOTE and origin != "timeout":
            # Each instance expires what it stops hearing; only news from here travels.
            self.history.publish_awareness(doc.name, payload)
        if not doc.peers:
            return
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
