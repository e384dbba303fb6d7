"""The hot path: one encoded packet, written to every socket of a room.

A broadcast is encoded once into its final Socket.IO text, and framed at
most once more into its final websocket bytes (see wsframe.py). For a socket
on an established websocket, delivering it is one `transport.write` of those
shared bytes: no task or queue in between. Everything else (long-polling
clients, a websocket still in its upgrade) gets the shared Engine.IO packet
text appended to what the session has pending (sockets.py).

Memory per client is bounded: the transport's write buffer or the pending
packets (their bytes counted) of a client that stopped reading would go
past the limit, and the client is evicted instead of written to.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from channels_common.wsframe import text_frame

from .metrics import HotCounters

log = logging.getLogger("channels.records.broadcast")

NAMESPACE = "/"


class Outgoing:
    """One broadcast as every recipient gets it: the engine.io packet text
    (for polling sessions and sessions mid-upgrade) and its websocket frame."""

    __slots__ = ("frame", "packet", "size")

    def __init__(self, text: str):
        self.packet = "4" + text
        self.size = len(self.packet)
        self.frame = text_frame(self.packet.encode("utf-8"))


class Held:
    """Packets for a socket that is still in its CONNECT handshake: they
    must follow the CONNECT reply (and any replay), so they wait here."""

    __slots__ = ("bytes", "packets")

    def __init__(self) -> None:
        self.packets: list[tuple[Outgoing, str | None]] = []
        self.bytes = 0


def raw_fd(transport) -> int:
    """The descriptor under a transport when bytes written to it go to the
    peer as they are (plain TCP, not TLS), else -1."""
    info = getattr(transport, "get_extra_info", None)
    if info is None or info("sslcontext") is not None or info("ssl_object") is not None:
        return -1
    sock = info("socket")
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return -1
    try:
        return sock.fileno()
    except (OSError, ValueError):
        return -1


class _Route:
    """One room's members as a broadcast reaches them (see Broadcaster._route)."""

    __slots__ = ("direct", "others", "sids")

    def __init__(self) -> None:
        # (transport, its raw descriptor (see raw_fd) or -1): written to directly
        self.direct: list[tuple[object, int]] = []
        self.sids: dict = {}  # transport -> eio_sid, for the few that cannot be
        self.others: list[str] = []


class Broadcaster:
    def __init__(
        self,
        engine,
        rooms,
        *,
        limit_bytes: int,
        on_overflow: Callable[[str], None],
        counters: HotCounters | None = None,
        order_key: Callable[[str], object] | None = None,
    ):
        self.sockets = engine.sockets  # eio_sid -> EngineSocket (sockets.py)
        self.rooms = rooms
        self.limit = limit_bytes
        self.on_overflow = on_overflow
        # Deliveries, and those written straight to a transport, for /metrics.
        self.counters = counters if counters is not None else HotCounters()
        self.held: dict[str, Held] = {}
        # eio_sid -> order key of the newest event a recovery replayed to it:
        # this instance's own live copies of those events, if still to come,
        # must not reach the socket a second time.
        self.floors: dict[str, object] = {}
        # eio_sid -> the offsets that replay carried: only these are skipped
        # at or below the floor (see set_floor).
        self.floor_offsets: dict[str, frozenset[str]] = {}
        # Set by the relay while events may come out of offset order (a
        # catch-up after a resubscription sent newer events of some rooms
        # before the live copies of older ones): a floor is then not taken
        # as passed by a newer event, so the replayed offsets stay skipped.
        self.unordered = False
        self.order_key = order_key
        # room -> _Route. Valid only while the room's members and their
        # sockets' states stay as they were: the engine and the manager
        # report every change (sockets.py), this class its own (held, floors).
        self._routes: dict[str, _Route] = {}
        engine.route_listeners.append(self.forget_routes)
        rooms.listeners.append(self.forget_routes)

    def to_room(self, room: str, text: str, offset: str | None = None) -> int:
        members = self.rooms.members.get(room)
        if not members:
            return 0
        route = self._routes.get(room)
        if route is None:
            route = self._routes[room] = self._route(members)
        out = Outgoing(text)
        frame = out.frame
        # Past this, the frame would take the transport's buffer over the limit.
        fits = self.limit - len(frame)
        late = None
        size = len(frame)
        write = os.write
        # The common case, and most of the service's CPU: sockets on an open
        # websocket, their transports looked up once per room (see _route).
        # A transport with nothing queued gets the frame straight from
        # os.write: uvloop's write would do the same system call after
        # buffering work of its own (measured ~0.4 µs per recipient). The
        # descriptor is trusted only while the transport is not closing:
        # uvloop flags that before it closes the descriptor, so a number
        # reused by a new connection is never written to.
        for transport, fd in route.direct:
            if not transport.is_closing():
                queued = transport.get_write_buffer_size()
                if not queued and fd >= 0:
                    try:
                        sent = write(fd, frame)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        sent = -1
                    if sent != size:
                        # The rest waits in the transport's buffer, in order; an
                        # error is met again there and closes the transport.
                        transport.write(frame if sent <= 0 else memoryview(frame)[sent:])
                    continue
                if queued <= fits:
                    transport.write(frame)
                    continue
            if late is None:
                late = [route.sids[transport]]
            else:
                late.append(route.sids[transport])
        written = len(route.direct) - (len(late) if late else 0)
        delivered = written
        if route.others or late:
            key = self.order_key(offset) if self.floors and offset is not None else None
            for eio_sid in route.others:
                delivered += self.deliver(eio_sid, out, offset, key)
            if late:
                # Over the limit or closing: deliver() decides (evicts or skips).
                for eio_sid in late:
                    delivered += self.deliver(eio_sid, out, offset, key)
        counters = self.counters
        counters.direct += written
        counters.deliveries += delivered
        return delivered

    def _route(self, members) -> _Route:
        """Split a room's members once: sockets whose packets may be written
        straight to their websocket's transport, and the rest (polling, in
        their CONNECT handshake, past a recovery floor, closing)."""
        route = _Route()
        held, floors, sockets = self.held, self.floors, self.sockets
        for eio_sid in members.values():
            sock = sockets.get(eio_sid)
            transport = getattr(sock, "transport", None)
            if (
                transport is not None
                and eio_sid not in held
                and eio_sid not in floors
                and not sock.closing
                and not sock.closed
            ):
                route.direct.append((transport, raw_fd(transport)))
                route.sids[transport] = eio_sid
            else:
                route.others.append(eio_sid)
        return route

    def forget_routes(self, room: str | None = None) -> None:
        """Something a route depends on changed: a room's members (`room`),
        or a socket's state (None: every room). Routes are rebuilt on the
        next broadcast to the room."""
        if room is None:
            self._routes.clear()
        else:
            self._routes.pop(room, None)

    def deliver(self, eio_sid: str, out: Outgoing, offset: str | None = None, key=None) -> bool:
        """Send one shared packet to one socket; never awaits."""
        if key is not None:
            floor = self.floors.get(eio_sid)
            if floor is not None:
                if key <= floor:
                    replayed = self.floor_offsets.get(eio_sid)
                    if replayed is None or offset in replayed:
                        return False  # already replayed
                    # At or below the floor but not replayed: an offset the
                    # log gave another event. Sent rather than lost.
                elif not self.unordered:
                    del self.floors[eio_sid]  # caught up: events come in offset order
                    self.floor_offsets.pop(eio_sid, None)
                    self._routes.clear()
        held = self.held.get(eio_sid)
        if held is not None:
            if held.bytes + out.size > self.limit:
                self.on_overflow(eio_sid)
                return False
            held.packets.append((out, offset))
            held.bytes += out.size
            return True
        return self._send(eio_sid, out)

    def _send(self, eio_sid: str, out: Outgoing) -> bool:
        sock = self.sockets.get(eio_sid)
        if sock is None or sock.closed or sock.closing:
            return False
        # Set only once the socket is on its websocket with nothing of its
        # own left pending (sockets.py), so nothing is overtaken.
        transport = getattr(sock, "transport", None)
        if transport is not None:
            if transport.is_closing():
                return False
            frame = out.frame
            if transport.get_write_buffer_size() + len(frame) > self.limit:
                self.on_overflow(eio_sid)
                return False
            transport.write(frame)
            self.counters.direct += 1
            return True
        if sock.pending_bytes + out.size > self.limit:
            self.on_overflow(eio_sid)
            return False
        sock.send(out.packet)
        return True

    def send_now(self, eio_sid: str, text: str) -> bool:
        """One packet for one socket ahead of anything held for it (the
        CONNECT reply, then replayed events)."""
        return self._send(eio_sid, Outgoing(text))

    def hold(self, eio_sid: str) -> None:
        self.held[eio_sid] = Held()
        self._routes.clear()

    def release(self, eio_sid: str, skip_offsets: frozenset[str] | set[str] = frozenset()) -> None:
        """Flush what arrived during the handshake, minus events the replay
        already carried (same offset), keeping their order."""
        held = self.held.pop(eio_sid, None)
        if held is None:
            return
        self._routes.clear()
        for out, offset in held.packets:
            if offset is not None and offset in skip_offsets:
                continue
            key = self.order_key(offset) if offset is not None and eio_sid in self.floors else None
            self.deliver(eio_sid, out, offset, key)

    def set_floor(self, eio_sid: str, offset: str, replayed: frozenset[str] | set[str] | None = None) -> None:
        """Live copies up to `offset` were replayed already: skipped (only
        those whose offset is in `replayed`, when given) until an event
        past it arrives."""
        self.floors[eio_sid] = self.order_key(offset)
        if replayed is not None:
            self.floor_offsets[eio_sid] = frozenset(replayed)
        self._routes.clear()

    def drop_held(self, eio_sid: str) -> None:
        if self.held.pop(eio_sid, None) is not None:
            self._routes.clear()

    def forget(self, eio_sid: str) -> None:
        self.floor_offsets.pop(eio_sid, None)
        held = self.held.pop(eio_sid, None)
        floor = self.floors.pop(eio_sid, None)  # both, whichever there is
        if held is not None or floor is not None:
            self._routes.clear()
