"""python-socketio / python-engineio, adapted where the records service needs
more than they offer:

- send queues that count their bytes (see broadcast.py), and a handle on each
  websocket's writer so that a client which stopped reading can be cut off
  even while a write to it is stuck;
- the CONNECT handshake is handed to the service (connections.py), which
  joins rooms before replying and speaks connection state recovery, which
  python-socketio does not implement.
"""

from __future__ import annotations

import asyncio

import engineio
import socketio
from engineio.async_drivers.asgi import WebSocket
from socketio import packet as sio_packet

from .broadcast import ByteCountingQueue


class TrackedWebSocket(WebSocket):
    def __init__(self, handler, server):
        super().__init__(handler, server)
        self.writer: asyncio.Task | None = None
        # The handler is the engine.io socket's bound method.
        socket = getattr(handler, "__self__", None)
        if socket is not None:
            socket.websocket = self

    async def send(self, message):
        self.writer = asyncio.current_task()
        await super().send(message)

    def abort(self) -> None:
        """Stop a write the client is not reading; the engine's writer then
        closes the websocket."""
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()


class RecordsEngine(engineio.AsyncServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A private copy: the driver table is shared module state.
        self._async = {**self._async, "websocket": TrackedWebSocket}

    def create_queue(self, *args, **kwargs):
        return ByteCountingQueue(*args, **kwargs)


class RecordsSocketServer(socketio.AsyncServer):
    """`connect_handler(eio_sid, auth)` performs the whole CONNECT handshake."""

    def __init__(self, *args, connect_handler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connect_handler = connect_handler

    def _engineio_server_class(self):
        return RecordsEngine

    async def _handle_connect(self, eio_sid, namespace, data):
        namespace = namespace or "/"
        if namespace != "/" or self.connect_handler is None:
            await self._send_packet(
                eio_sid,
                self.packet_class(sio_packet.CONNECT_ERROR, data={"message": "Invalid namespace"}, namespace=namespace),
            )
            return
        if self.manager.sid_from_eio_sid(eio_sid, namespace) is not None:
            return  # a second CONNECT on the same connection: ignore it
        await self.connect_handler(eio_sid, data)
