"""Engine.IO over the lean websocket protocol (channels_common.wsserver):
a session opened on a websocket, or a polling session's upgrade probe.

Once accepted, the connection is detached from ASGI: its messages arrive
as callbacks, and the session writes frames straight to the connection's
transport, so an idle client costs no task.
"""

from __future__ import annotations

import asyncio
import logging

from channels_common.closecodes import NORMAL
from channels_common.wsframe import text_frame
from channels_common.wsserver import DETACH, FIRST_FRAMES

from . import engineio as eio
from .polling import Cors
from .sockets import Engine, EngineSocket

log = logging.getLogger("channels.records.websocket")

# As engine.io: a probe that does not complete in this time is dropped.
UPGRADE_TIMEOUT_SECONDS = 10.0


def decode_or_log(data) -> eio.Packet | None:
    try:
        return eio.decode_packet(data)
    except eio.EngineIOProtocolError as exc:
        log.warning(
            "malformed engine.io packet from client, connection closed",
            extra={"error": str(exc), "size": len(data) if data else 0},
        )
        return None


class Direct:
    """The callbacks of a session that is on its websocket for good."""

    __slots__ = ("sock",)

    def __init__(self, sock: EngineSocket):
        self.sock = sock

    def on_message(self, data) -> None:
        sock = self.sock
        if sock.closing:
            return
        packet = decode_or_log(data)
        if packet is None:
            sock.close(eio.PARSE_ERROR)
            return
        sock.receive(packet)

    def on_close(self, code) -> None:
        self.sock.close(eio.TRANSPORT_CLOSE, notify_client=False)


class Upgrade:
    """The callbacks of a websocket probing to take over a polling session."""

    __slots__ = ("direct", "probe", "protocol", "sock", "timer")

    def __init__(self, sock: EngineSocket, protocol):
        self.sock = sock
        self.protocol = protocol
        self.probe = eio.UpgradeProbe()
        self.direct: Direct | None = None
        self.timer = asyncio.get_running_loop().call_later(UPGRADE_TIMEOUT_SECONDS, self._fail)

    def on_message(self, data) -> None:
        if self.direct is not None:
            self.direct.on_message(data)
            return
        sock = self.sock
        if sock.closing:
            return
        packet = decode_or_log(data)
        action = "fail" if packet is None else self.probe.feed(packet)
        if action == "probe":
            self.protocol.transport.write(text_frame(b"3probe"))
            sock.send(eio.NOOP)  # ends the pending long-poll
        elif action == "upgrade":
            self.timer.cancel()
            self.direct = Direct(sock)
            sock.go_direct(self.protocol.transport)
        elif action == "fail":
            self._fail()

    def _fail(self) -> None:
        if self.direct is not None:
            return
        self.timer.cancel()
        sock = self.sock
        if sock.websocket is self.protocol:
            sock.websocket = None
            sock.upgrading = False
        self.protocol.close(NORMAL)

    def on_close(self, code) -> None:
        if self.direct is not None:
            self.direct.on_close(code)
        else:
            self._fail()


class WebSockets:
    """Engine.IO websocket requests: admitted or refused, then attached to
    their session. Two servers use it: the records port's HTTP protocol,
    which accepts the upgrade it has read itself (httpserver.py), and the
    ASGI application (`__call__`), under LeanWebSocketProtocol."""

    def __init__(self, engine: Engine, cors: Cors):
        self.engine = engine
        self.cors = cors

    def admit(self, query_string: bytes, headers: dict[bytes, bytes], secure: bool) -> eio.Query | None:
        """The request's engine.io query, or None when it is refused
        (origin, transport, session)."""
        if self.cors.refuses(headers, secure):
            log.info("websocket from a refused origin")
            return None
        query = eio.parse_query(query_string)
        if eio.check_request(query, "GET", True, self.engine.transport_of) is not None:
            return None
        return query

    def attach(self, query: eio.Query, query_string: bytes, protocol) -> tuple[bytes, Direct | Upgrade] | None:
        """Attach an admitted websocket (`protocol`, connected, its 101 not yet
        written) to a new session, or to the polling session it probes to
        take over: the frames to write with the 101 (a new session's OPEN)
        and the callbacks that serve it. None: that session cannot be
        upgraded now. Nothing may be written between this and the 101."""
        if query.sid is None:
            sock, packet = self.engine.open(query_string.decode("latin-1"), "websocket")
            sock.websocket = protocol
            sock.go_direct(protocol.transport)
            return text_frame(packet.encode()), Direct(sock)
        sock = self.engine.sockets[query.sid]
        if sock.upgrading or sock.closing:
            return None
        sock.upgrading = True
        sock.websocket = protocol
        return b"", Upgrade(sock, protocol)

    async def __call__(self, scope, receive, send) -> None:
        query_string = scope.get("query_string", b"")
        query = self.admit(query_string, dict(scope.get("headers") or ()), scope.get("scheme") == "wss")
        if query is None:
            await send({"type": "websocket.close"})
            return
        if not {DETACH, FIRST_FRAMES} <= (scope.get("extensions") or {}).keys():
            log.error("websocket server without our extensions: run under LeanWebSocketProtocol")
            await send({"type": "websocket.close"})
            return
        if (await receive())["type"] != "websocket.connect":
            return
        protocol = send.__self__  # the lean protocol (see wsserver.DETACH)
        attached = self.attach(query, query_string, protocol)
        if attached is None:
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": NORMAL})
            return
        first, handler = attached
        # A new session's OPEN packet goes out with the 101, in one write.
        await send({"type": "websocket.accept", FIRST_FRAMES: first} if first else {"type": "websocket.accept"})
        await send({"type": DETACH, "on_message": handler.on_message, "on_close": handler.on_close})
