"""Socket.IO on the engine's sessions, default namespace only: client
packets parsed strictly (socketio.py) and dispatched; a CONNECT goes to
connections.py, which answers it; a closed session's sid leaves its rooms.

What a client may send: CONNECT (once), DISCONNECT, and EVENTs or ACKs once
connected, which Loomio's clients never send and which are ignored.
Anything else closes the session with a log line, as socket.io does.
"""

from __future__ import annotations

import asyncio
import logging

from channels_common.tasks import spawn

from . import engineio as eio
from . import socketio as sio
from .sockets import EngineSocket, Rooms

log = logging.getLogger("channels.records.gateway")

CLIENT_DISCONNECT = "client disconnect"


class Gateway:
    def __init__(self, rooms: Rooms, broadcaster):
        self.rooms = rooms
        self.broadcaster = broadcaster
        self.connections = None  # set once Redis is there (app.py)
        self._tasks: set[asyncio.Task] = set()

    def connecting_or_connected(self, sock: EngineSocket) -> bool:
        return sock.sid in self.rooms.sid_of or sock.sid in self.broadcaster.held

    def on_message(self, sock: EngineSocket, data) -> None:
        try:
            packet = sio.decode(data)
        except sio.SocketIOProtocolError as exc:
            log.warning(
                "malformed packet from client, connection closed",
                extra={"error": str(exc), "size": len(data) if data else 0},
            )
            sock.close(eio.PARSE_ERROR)
            return
        if packet.namespace != sio.DEFAULT_NAMESPACE:
            if packet.type == sio.CONNECT:
                sock.send(eio.MESSAGE + sio.encode_connect_error("Invalid namespace", packet.namespace))
            else:
                log.warning("packet for a namespace not connected, connection closed")
                sock.close(eio.PARSE_ERROR)
            return
        kind = packet.type
        if kind == sio.CONNECT:
            if self.connecting_or_connected(sock) or self.connections is None:
                return  # a second CONNECT on one session is ignored
            spawn(self.connections.connect(sock.sid, packet.data), name="records-connect", tasks=self._tasks)
        elif kind == sio.DISCONNECT:
            sid = self.rooms.sid_of.get(sock.sid)
            if sid is not None:
                self._disconnected(sock.sid, sid, CLIENT_DISCONNECT)
        elif kind == sio.CONNECT_ERROR or not self.connecting_or_connected(sock):
            log.warning("packet before CONNECT, connection closed", extra={"type": kind})
            sock.close(eio.PARSE_ERROR)
        # EVENT and ACK from a connected client: nothing listens to them.

    def on_close(self, sock: EngineSocket, reason: str) -> None:
        """Synchronous on purpose: a recovering connection may be about to
        register the same sid; nothing may run in between."""
        sid = self.rooms.sid_of.get(sock.sid)
        if sid is not None:
            self._disconnected(sock.sid, sid, reason)
        self.broadcaster.forget(sock.sid)

    def _disconnected(self, eio_sid: str, sid: str, reason: str) -> None:
        if self.connections is not None:
            self.connections.disconnected(sid, reason)
        self.rooms.remove(sid)
        self.broadcaster.forget(eio_sid)
