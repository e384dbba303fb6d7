"""One live document (its pycrdt Doc, Awareness and peers), what a peer is
to it, pycrdt calls on untrusted bytes, and fan-out to its peers.

A broadcast frame is encoded once per distinct address (with no session
awareness every peer shares the document name, so once per change) and the
same bytes object is handed to every peer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from pycrdt import Awareness, Doc

from .store import Debounce


class BadUpdate(ValueError):
    """A Yjs payload that cannot be decoded or applied."""


class Peer(Protocol):
    """One authenticated (socket, document) pair."""

    address: str
    readonly: bool

    def send(self, frame: bytes) -> None: ...

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...


def crdt_call(fn: Callable, *args):
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


# A peer's awareness clients, as a tuple (a provider has one; a set of one
# costs four times the memory), replaced on change; none at first.
NO_CLIENTS: tuple[int, ...] = ()


class _LockOnFirstUse:
    """The lock pycrdt's async transactions take, made when one first does:
    an anyio Lock holds a deque (~600 B) from birth, and this server only
    ever uses synchronous transactions."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = None

    async def acquire(self) -> None:
        if self._lock is None:
            import anyio  # pycrdt's own dependency

            self._lock = anyio.Lock()
        await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


def lean_doc() -> Doc:
    """A pycrdt Doc without what it makes eagerly for async use: its async
    transaction lock and its event stream sets (~1.5 KiB a document) come
    on first use. Private names of pycrdt, held by test_pycrdt_contract.py."""
    ydoc = Doc()
    ydoc._txn_async_lock = _LockOnFirstUse()
    ydoc._send_streams = defaultdict(set)
    return ydoc


class LiveDocument:
    __slots__ = ("_outbox", "_subs", "awareness", "debounce", "name", "peers", "timer", "unused_since", "ydoc")

    def __init__(self, name: str, debounce: Debounce):
        self.name = name
        self.ydoc = lean_doc()
        self.awareness = Awareness(self.ydoc)
        # The server is not an editor: it has no presence of its own.
        self.awareness.set_local_state(None)
        self.peers: dict[Peer, tuple[int, ...]] = {}
        self.debounce = debounce
        self.timer: Any = None
        self._outbox: list[bytes] = []
        self._subs: list = []
        self.unused_since = time.monotonic()

    def state(self) -> bytes:
        return self.ydoc.get_update()

    def collect(self, event) -> None:
        """The ydoc's observer (a bound method: no closure per document)."""
        self._outbox.append(event.update)


def broadcast(doc: LiveDocument, encode: Callable[..., bytes], payload, exclude: Peer | None = None) -> None:
    """Send `encode(address, payload)` to every peer but `exclude`: one
    encoding per distinct address, no closure per call."""
    cached_address = None
    frame = b""
    for peer in tuple(doc.peers):
        if peer is exclude:
            continue
        if peer.address != cached_address:
            cached_address = peer.address
            frame = encode(cached_address, payload)
        peer.send(frame)
