"""python-socketio / python-engineio, adapted where the records service needs
more than they offer:

- send queues that count their bytes (see broadcast.py), and a handle on each
  websocket's writer so that a client which stopped reading can be cut off
  even while a write to it is stuck;
- each websocket's transport, for the broadcast fast path (broadcast.py),
  and whether engine.io's own writer is in the middle of a send;
- the CONNECT handshake is handed to the service (connections.py), which
  joins rooms before replying and speaks connection state recovery, which
  python-socketio does not implement.
"""

from __future__ import annotations

import asyncio
import logging

import engineio
import socketio
from engineio import packet as eio_packet
from engineio.async_drivers.asgi import WebSocket
from socketio import packet as sio_packet

from .broadcast import ByteCountingQueue

log = logging.getLogger("channels.records.engine")

# What python-socketio raises on a packet it cannot parse or dispatch.
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)


def server_transport(send) -> asyncio.Transport | None:
    """The transport under an ASGI websocket `send`: uvicorn's websocket
    protocols hand their bound method over, their transport beside it."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "get_write_buffer_size"):
        return None
    return transport


class TrackedWebSocket(WebSocket):
    def __init__(self, handler, server):
        super().__init__(handler, server)
        self.writer: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self.sending = False
        # The handler is the engine.io socket's bound method.
        socket = getattr(handler, "__self__", None)
        if socket is not None:
            socket.websocket = self

    async def __call__(self, environ):
        self.asgi_receive = environ["asgi.receive"]
        self.asgi_send = environ["asgi.send"]
        await self.asgi_send({"type": "websocket.accept"})
        # Only now: nothing may reach the transport before the handshake.
        self.transport = server_transport(self.asgi_send)
        try:
            await self.handler(self)
        finally:
            self.transport = None
        return ""

    async def send(self, message):
        self.writer = asyncio.current_task()
        self.sending = True
        try:
            await super().send(message)
        finally:
            self.sending = False

    async def wait(self):
        data = await super().wait()
        # engine.io decodes websocket messages outside of any error handling,
        # so a bad one would surface as an application crash: vet it here
        # (clients send only tiny pings and handshakes, so this costs nothing).
        try:
            if not data:
                raise ValueError("empty message")
            eio_packet.Packet(encoded_packet=data)
        except MALFORMED as exc:
            log.warning(
                "malformed engine.io packet from client, connection closed",
                extra={"error": type(exc).__name__, "size": len(data) if data else 0},
            )
            raise OSError("malformed engine.io packet") from None
        return data

    def abort(self) -> None:
        """Stop a write the client is not reading; the engine's writer then
        closes the websocket. What was written directly to the transport is
        dropped with the connection."""
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()


class QuietClientErrors(logging.Filter):
    """engine.io logs a full traceback at ERROR for every request body it
    cannot parse; that is a hostile or broken client, not a fault here."""

    CLIENT_FAULTS = ("post request handler error", "message async handler error")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.CLIENT_FAULTS and record.exc_info:
            exc = record.exc_info[1]
            record.msg = "malformed request from client, rejected"
            record.args = ()
            record.error = type(exc).__name__
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RecordsEngine(engineio.AsyncServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A private copy: the driver table is shared module state.
        self._async = {**self._async, "websocket": TrackedWebSocket}
        self.logger.addFilter(QuietClientErrors())

    def create_queue(self, *args, **kwargs):
        return ByteCountingQueue(*args, **kwargs)


class RecordsSocketServer(socketio.AsyncServer):
    """`connect_handler(eio_sid, auth)` performs the whole CONNECT handshake."""

    def __init__(self, *args, connect_handler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connect_handler = connect_handler

    def _engineio_server_class(self):
        return RecordsEngine

    async def _handle_eio_message(self, eio_sid, data):
        try:
            await super()._handle_eio_message(eio_sid, data)
        except MALFORMED as exc:
            # As socket.io does on a parse error: drop the packet and the
            # connection (the client reconnects if it is a real one).
            log.warning(
                "malformed packet from client, connection closed",
                extra={"error": type(exc).__name__, "size": len(data) if data is not None else 0},
            )
            self._binary_packet.pop(eio_sid, None)
            sock = self.eio.sockets.get(eio_sid)
            if sock is not None:
                await sock.close(wait=False, abort=False)

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
