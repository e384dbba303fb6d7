"""The service's sockets and rooms: plain structures that the transports
(polling.py, websocket.py), the broadcaster and connections.py share.

An `EngineSocket` is one Engine.IO session. Until it is on its websocket
for good, what is sent to it waits in `pending` (engine.io packet texts,
their characters counted) for a long-poll to take, or for the upgrade to flush
it. Once on the websocket, `transport` is set and every packet is framed
and written at once, in call order; the broadcast fast path writes there
too. `Rooms` maps Socket.IO sids to rooms and to their engine.io sessions.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from channels_common.closecodes import NORMAL
from channels_common.tasks import spawn
from channels_common.wsframe import text_frame

from . import engineio as eio

log = logging.getLogger("channels.records.sockets")

PING_TICK_SECONDS = 1.0
# A socket.io server closes a session that sends no CONNECT in this time.
CONNECT_TIMEOUT_SECONDS = 45.0
# Time a polling session has to take its last packets (a CLOSE) once closed.
CLOSE_LINGER_SECONDS = 2.0


def new_sid() -> str:
    """20 URL-safe characters, as engine.io and socket.io make them."""
    return secrets.token_urlsafe(15)


class Rooms:
    """room -> {sid: eio_sid}, and the way back. Listeners hear of every
    room whose members change (the broadcaster caches routes per room)."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, str]] = {}
        self.of_sid: dict[str, set[str]] = {}
        self.eio_of: dict[str, str] = {}
        self.sid_of: dict[str, str] = {}
        self.listeners: list[Callable[[str | None], None]] = []

    def add(self, sid: str, eio_sid: str) -> None:
        self.eio_of[sid] = eio_sid
        self.sid_of[eio_sid] = sid
        self.of_sid.setdefault(sid, set())

    def enter(self, sid: str, room: str) -> None:
        """A sid not (or no longer) registered joins nothing."""
        eio_sid = self.eio_of.get(sid)
        rooms = self.of_sid.get(sid)
        if eio_sid is None or rooms is None or room in rooms:
            return
        rooms.add(room)
        self.members.setdefault(room, {})[sid] = eio_sid
        self._changed(room)

    def leave(self, sid: str, room: str) -> None:
        rooms = self.of_sid.get(sid)
        if rooms is None or room not in rooms:
            return
        rooms.discard(room)
        members = self.members.get(room)
        if members is not None:
            members.pop(sid, None)
            if not members:
                del self.members[room]
        self._changed(room)

    def remove(self, sid: str) -> None:
        for room in list(self.of_sid.get(sid, ())):
            self.leave(sid, room)
        self.of_sid.pop(sid, None)
        eio_sid = self.eio_of.pop(sid, None)
        if eio_sid is not None and self.sid_of.get(eio_sid) == sid:
            del self.sid_of[eio_sid]

    def _changed(self, room: str) -> None:
        for listener in self.listeners:
            listener(room)


class EngineSocket:
    __slots__ = (
        "clock",
        "closed",
        "closing",
        "connected_at",
        "engine",
        "pending",
        "pending_bytes",
        "posting",
        "query",
        "sid",
        "transport",
        "transport_name",
        "upgrading",
        "waiter",
        "websocket",
    )

    def __init__(self, engine: Engine, sid: str, query: str, transport_name: str):
        self.engine = engine
        self.sid = sid
        self.query = query  # the handshake's query string (the channel token is in it)
        self.transport_name = transport_name
        self.transport: asyncio.Transport | None = None  # set once on the websocket for good
        self.websocket = None  # the websocket protocol (see websocket.py)
        self.pending: list[str] = []
        self.pending_bytes = 0
        # A held long-poll: anything with done() and set_result(), a future
        # (polling.AsgiPolling) or the connection itself (httpserver.py).
        self.waiter = None
        self.posting = False
        self.upgrading = False
        self.closing = False
        self.closed = False
        now = time.monotonic()
        self.connected_at = now
        self.clock = eio.PingClock(engine.ping_interval, engine.ping_timeout, now)

    # -- outgoing ------------------------------------------------------------

    def send(self, packet: str) -> None:
        """One engine.io packet text (type first), in call order."""
        if self.closed:
            return
        transport = self.transport
        if transport is not None:
            if not transport.is_closing():
                transport.write(text_frame(packet.encode("utf-8")))
            return
        self.pending.append(packet)
        self.pending_bytes += len(packet)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_pending(self) -> list[str]:
        packets, self.pending, self.pending_bytes = self.pending, [], 0
        return packets

    def go_direct(self, transport) -> None:
        """On the websocket for good: flush what waited, then write direct."""
        self.transport_name = "websocket"
        self.upgrading = False
        for packet in self.take_pending():
            transport.write(text_frame(packet.encode("utf-8")))
        self.transport = transport
        self.wake()  # a poll still held gets an empty answer
        self.engine.routes_changed()

    # -- incoming ------------------------------------------------------------

    def receive(self, packet: eio.Packet) -> None:
        kind = packet.type
        if kind == eio.PONG:
            self.clock.pong(time.monotonic())
        elif kind == eio.MESSAGE:
            self.engine.on_message(self, packet.data)
        elif kind == eio.CLOSE:
            self.close(eio.TRANSPORT_CLOSE, notify_client=False)
        # OPEN, PING, UPGRADE and NOOP outside an upgrade mean nothing here.

    # -- closing -------------------------------------------------------------

    def close(self, reason: str, notify_client: bool = True, abort: bool = False, ws_code: int = NORMAL) -> None:
        """End the session (once). The Socket.IO layer hears of it first; then
        a websocket gets a close frame with `ws_code` (or is cut off:
        `abort`), a polling client its CLOSE packet on the next poll."""
        if self.closing:
            return
        self.closing = True
        self.engine.routes_changed()
        try:
            self.engine.on_close(self, reason)
        finally:
            self.transport = None
            ws, self.websocket = self.websocket, None
            if ws is not None:
                if abort:
                    ws.transport.abort()
                else:
                    ws.close(ws_code)
            if self.transport_name == "polling" and notify_client and not abort:
                self.pending.append(eio.CLOSE)
                self.wake()
                # The closed session answers one more poll, then goes.
                asyncio.get_running_loop().call_later(CLOSE_LINGER_SECONDS, self.discard)
            else:
                self.discard()

    def discard(self) -> None:
        self.closing = True
        self.closed = True
        self.pending, self.pending_bytes = [], 0
        self.wake()
        self.engine.forget(self)


class Engine:
    """Every engine.io session of this process, one pinger for all of them.

    `on_message(sock, data)` gets each MESSAGE; `on_close(sock, reason)` is
    called once per session as it closes, before anything is released."""

    def __init__(
        self,
        *,
        ping_interval: float = 25.0,
        ping_timeout: float = 20.0,
        max_payload: int = 1_000_000,
        on_message: Callable[[EngineSocket, str | bytes], None] | None = None,
        on_close: Callable[[EngineSocket, str], None] | None = None,
        connected: Callable[[EngineSocket], bool] = lambda sock: True,
    ):
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_payload = max_payload
        self.sockets: dict[str, EngineSocket] = {}
        self.on_message = on_message or (lambda sock, data: None)
        self.on_close = on_close or (lambda sock, reason: None)
        self.connected = connected  # has the session's Socket.IO CONNECT been answered
        self.route_listeners: list[Callable[[str | None], None]] = []
        self._pinger: asyncio.Task | None = None

    def open(self, query: str, transport_name: str) -> tuple[EngineSocket, str]:
        """A new session and the OPEN packet that starts it."""
        sid = new_sid()
        sock = EngineSocket(self, sid, query, transport_name)
        self.sockets[sid] = sock
        upgrades = ["websocket"] if transport_name == "polling" else []
        packet = eio.open_packet(
            sid, upgrades, int(self.ping_interval * 1000), int(self.ping_timeout * 1000), self.max_payload
        )
        self.start_pinger()
        return sock, packet

    def transport_of(self, sid: str) -> str | None:
        sock = self.sockets.get(sid)
        if sock is None or sock.closed:
            return None  # a closing polling session still hands out its CLOSE
        return sock.transport_name

    def forget(self, sock: EngineSocket) -> None:
        if self.sockets.get(sock.sid) is sock:
            del self.sockets[sock.sid]
            self.routes_changed()

    def routes_changed(self) -> None:
        for listener in self.route_listeners:
            listener(None)

    def start_pinger(self) -> None:
        if self._pinger is None or self._pinger.done():
            self._pinger = spawn(self._ping_forever(), name="engineio-pinger")

    def stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.sleep(PING_TICK_SECONDS)
            try:
                self.tick(time.monotonic())
            except Exception:
                log.exception("ping round failed")

    def tick(self, now: float) -> None:
        """PINGs to the sessions that are due one, spread out as their pongs
        came in; sessions that did not answer, or never sent CONNECT, close."""
        for sock in list(self.sockets.values()):
            if sock.closing:
                continue
            action = sock.clock.tick(now)
            if action == eio.PING:
                sock.send(eio.PING)
            elif action == eio.PING_TIMEOUT:
                sock.close(eio.PING_TIMEOUT, notify_client=False)
            elif now - sock.connected_at > CONNECT_TIMEOUT_SECONDS and not self.connected(sock):
                sock.close(eio.SERVER_CLOSE)
