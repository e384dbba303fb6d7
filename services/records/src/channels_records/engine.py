"""python-socketio / python-engineio, adapted where the records service needs
more than they offer:

- send queues that count their bytes (see broadcast.py), for long-polling;
- a lean websocket transport (RecordsSocket): once a socket is on its
  websocket, every packet is framed and written straight to the connection's
  transport (the broadcast fast path of broadcast.py writes there too), so a
  websocket client costs no writer task, no reader task per message and no
  ping task: one pinger serves every socket;
- the CONNECT handshake is handed to the service (connections.py), which
  joins rooms before replying and speaks connection state recovery, which
  python-socketio does not implement.
"""

from __future__ import annotations

import asyncio
import logging
import time

import engineio
import socketio
from channels_common.wsframe import binary_frame, text_frame
from channels_common.wsserver import DETACH
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_drivers.asgi import WebSocket
from engineio.async_drivers.asgi import translate_request as asgi_translate_request
from engineio.async_socket import AsyncSocket
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


def vet_packet(data):
    """The engine.io packet in a websocket message, or None (logged) when it
    is malformed. engine.io decodes websocket messages outside of any error
    handling, so a bad one would surface as an application crash."""
    try:
        if not data:
            raise ValueError("empty message")
        return eio_packet.Packet(encoded_packet=data)
    except MALFORMED as exc:
        log.warning(
            "malformed engine.io packet from client, connection closed",
            extra={"error": type(exc).__name__, "size": len(data) if data else 0},
        )
        return None


class TrackedWebSocket(WebSocket):
    def __init__(self, handler, server):
        super().__init__(handler, server)
        self.writer: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self.scope_extensions = ()
        self.detached = False
        # The handler is the engine.io socket's bound method.
        socket = getattr(handler, "__self__", None)
        if socket is not None:
            socket.websocket = self

    async def __call__(self, environ):
        self.asgi_receive = environ["asgi.receive"]
        self.asgi_send = environ["asgi.send"]
        self.scope_extensions = environ["asgi.scope"].get("extensions") or ()
        await self.asgi_send({"type": "websocket.accept"})
        # Only now: nothing may reach the transport before the handshake.
        self.transport = server_transport(self.asgi_send)
        try:
            await self.handler(self)
        finally:
            if not self.detached:
                self.transport = None
        return ""

    async def send(self, message):
        self.writer = asyncio.current_task()
        await super().send(message)

    async def wait(self):
        data = await super().wait()
        if vet_packet(data) is None:
            raise OSError("malformed engine.io packet")
        return data

    @property
    def can_detach(self) -> bool:
        return DETACH in self.scope_extensions

    async def detach(self, on_message, on_close) -> None:
        await self.asgi_send({"type": DETACH, "on_message": on_message, "on_close": on_close})
        self.detached = True

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


# What python-engineio/socketio and connections.py read from a websocket's
# environ. The environ lives as long as the connection, so the rest of what
# the ASGI driver copies into it (every header) is left out.
_WEBSOCKET_ENVIRON_KEYS = (
    "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "HTTP_HOST", "HTTP_ORIGIN",
    "HTTP_UPGRADE", "HTTP_CONNECTION", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
    "wsgi.url_scheme", "asgi.receive", "asgi.send", "asgi.scope",
)


async def translate_request(scope, receive, send):
    environ = await asgi_translate_request(scope, receive, send)
    if scope.get("type") != "websocket" or not environ:
        return environ
    kept = {key: environ[key] for key in _WEBSOCKET_ENVIRON_KEYS if key in environ}
    # python-engineio and TrackedWebSocket read only these two of the ASGI
    # scope; keeping the whole scope would keep every header and the
    # request line for the life of the connection (~1.5 KiB each).
    kept["asgi.scope"] = {"type": scope["type"], "extensions": scope.get("extensions")}
    return kept


class _NoQueue:
    """Stands in for the send queue of a socket on its websocket for good:
    it writes straight to the transport and never queues again."""

    bytes = 0

    def put_nowait(self, item):
        pass

    async def put(self, item):
        pass

    def get_nowait(self):
        raise asyncio.QueueEmpty

    async def get(self):
        raise asyncio.QueueEmpty

    def task_done(self):
        pass

    async def join(self):
        pass

    def empty(self):
        return True

    def qsize(self):
        return 0

    def discard_all(self):
        pass


NO_QUEUE = _NoQueue()
PING_TICK_SECONDS = 1.0
# A server-closed websocket whose client does not close it in this time
# (a dead peer) is cut off.
CLOSE_GRACE_SECONDS = 5.0


def write_packet(transport: asyncio.Transport, pkt) -> None:
    encoded = pkt.encode()
    if isinstance(encoded, str):
        transport.write(text_frame(encoded.encode("utf-8")))
    else:
        transport.write(binary_frame(encoded))


class RecordsSocket(AsyncSocket):
    """An engine.io socket whose websocket transport is driven without
    per-socket tasks besides the connection's own.

    Until the upgrade completes (or for good, with long-polling) packets go
    through the send queue as in python-engineio. Once on the websocket, the
    queue is flushed to the transport and `transport` is set: from then on
    every packet is written at once, in call order, and the broadcast fast
    path writes to the same transport."""

    websocket: TrackedWebSocket | None = None
    _transport: asyncio.Transport | None = None

    # The broadcaster caches which sockets it may write to directly (see
    # broadcast.py); these two change that, so the engine hears of them.
    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    @transport.setter
    def transport(self, value: asyncio.Transport | None) -> None:
        self._transport = value
        self.server.routes_changed()

    @property
    def closing(self) -> bool:
        # Set by python-engineio in the instance's dict before the socket
        # became a RecordsSocket, so it is kept there.
        return self.__dict__.get("closing", False)

    @closing.setter
    def closing(self, value: bool) -> None:
        self.__dict__["closing"] = value
        self.server.routes_changed()

    next_ping = 0.0  # monotonic time this socket is due its next PING

    def schedule_ping(self):
        # The engine's pinger sends the next PING (see RecordsEngine).
        self.last_ping = None
        self.next_ping = time.monotonic() + self.server.ping_interval
        self.server.start_pinger()

    async def send(self, pkt):
        transport = self.transport
        if transport is None:
            await super().send(pkt)
        elif not transport.is_closing():
            write_packet(transport, pkt)

    async def _websocket_handler(self, ws):
        transport = getattr(ws, "transport", None)
        if transport is None:
            # Not under uvicorn: python-engineio's own writer task.
            return await super()._websocket_handler(ws)
        if self.connected:
            if not await self._complete_upgrade(ws, transport):
                return
        else:
            self.connected = True
        self.upgraded = True
        while True:
            try:
                pkt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.queue.task_done()
            if pkt is None:
                # Closed meanwhile: the client is told by the CLOSE packet.
                await ws.close()
                return
            write_packet(transport, pkt)
        self.queue = NO_QUEUE
        self.transport = transport
        if ws.can_detach:
            # Messages now come as callbacks from the protocol; the ASGI
            # task and its stack of coroutines end here.
            await ws.detach(self._on_message, self._on_close)
            return
        try:
            # A client that stops answering PINGs is closed by engine.io's
            # service task (see close), so no timer per socket here.
            while not self.closed:
                try:
                    data = await ws.wait()
                except OSError:
                    break
                if len(data) > self.server.max_http_buffer_size:
                    break
                try:
                    await self.receive(eio_packet.Packet(encoded_packet=data))
                except eio_exceptions.UnknownPacketError:
                    pass
                except eio_exceptions.SocketIsClosedError:
                    break
                except Exception:
                    log.exception("unexpected error in a client packet")
        finally:
            self.transport = None
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
            await ws.close()

    def _on_message(self, data) -> None:
        if self.transport is None:
            return
        pkt = vet_packet(data)
        if pkt is None or len(data) > self.server.max_http_buffer_size:
            self._on_close()
            return
        if pkt.packet_type == eio_packet.PONG:
            self.schedule_ping()  # the common case, without a task
            return
        self.server.run_detached(self._receive(pkt))

    async def _receive(self, pkt) -> None:
        try:
            await self.receive(pkt)
        except (eio_exceptions.UnknownPacketError, eio_exceptions.SocketIsClosedError):
            pass
        except Exception:
            log.exception("unexpected error in a client packet")

    def _on_close(self, code: int | None = None) -> None:
        if self.transport is None:
            return
        self.transport = None
        self.server.run_detached(self._end())

    async def _end(self) -> None:
        await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
        ws = self.websocket
        if ws is not None:
            ws.transport = None
            await ws.close()
        if self.server.sockets.get(self.sid) is self:
            del self.server.sockets[self.sid]

    async def close(self, wait=True, abort=False, reason=None):
        transport = self.transport
        await super().close(wait=wait, abort=abort, reason=reason)
        if transport is not None:
            # The CLOSE packet is out; the client closes the websocket, or
            # is gone and gets cut off.
            asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, transport.abort)

    async def _complete_upgrade(self, ws, transport) -> bool:
        """The polling -> websocket probe: PING "probe", PONG "probe", a
        NOOP to end the pending long-poll, then the client's UPGRADE."""
        self.upgrading = True
        try:
            try:
                probe = eio_packet.Packet(encoded_packet=await ws.wait())
            except OSError:
                return False
            if probe.packet_type != eio_packet.PING or probe.data != "probe":
                return False
            write_packet(transport, eio_packet.Packet(eio_packet.PONG, data="probe"))
            await self.queue.put(eio_packet.Packet(eio_packet.NOOP))
            try:
                upgrade = eio_packet.Packet(encoded_packet=await ws.wait())
            except OSError:
                return False
            return upgrade.packet_type == eio_packet.UPGRADE
        finally:
            self.upgrading = False


class _Sockets(dict):
    """engine.io creates its sockets as AsyncSocket; they become
    RecordsSocket as they are registered (same fields, other methods)."""

    def __init__(self, on_remove):
        super().__init__()
        self.on_remove = on_remove

    def __setitem__(self, sid, sock):
        if type(sock) is AsyncSocket:
            sock.__class__ = RecordsSocket
        super().__setitem__(sid, sock)

    def __delitem__(self, sid):
        super().__delitem__(sid)
        self.on_remove()

    def pop(self, sid, *default):
        value = super().pop(sid, *default)
        self.on_remove()
        return value


class RecordsEngine(engineio.AsyncServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A private copy: the driver table is shared module state.
        self._async = {**self._async, "websocket": TrackedWebSocket, "translate_request": translate_request}
        self.logger.addFilter(QuietClientErrors())
        # Called with None when a socket's state changes (see RecordsSocket).
        self.route_listeners: list = []
        self.sockets = _Sockets(self.routes_changed)
        self._pinger: asyncio.Task | None = None
        self._detached_tasks: set[asyncio.Task] = set()

    def routes_changed(self) -> None:
        for listener in self.route_listeners:
            listener(None)

    def run_detached(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._detached_tasks.add(task)
        task.add_done_callback(self._detached_tasks.discard)

    def start_pinger(self) -> None:
        if self._pinger is None or self._pinger.done():
            self._pinger = asyncio.get_running_loop().create_task(self._ping_forever(), name="engineio-pinger")

    async def _ping_forever(self) -> None:
        """A PING to each socket a ping interval after it answered the last
        one (to within a tick), so that pings and pongs stay spread out
        instead of coming in one burst; engine.io's service task closes the
        sockets that do not answer in time."""
        ping = eio_packet.Packet(eio_packet.PING)
        while True:
            await asyncio.sleep(PING_TICK_SECONDS)
            now, wall = time.monotonic(), time.time()
            for sock in list(self.sockets.values()):
                if sock.last_ping is not None or sock.next_ping > now or sock.closing or sock.closed:
                    continue
                sock.last_ping = wall
                try:
                    await sock.send(ping)
                except Exception:
                    log.exception("ping failed")

    def create_queue(self, *args, **kwargs):
        return ByteCountingQueue(*args, **kwargs)


class RecordsManager(socketio.AsyncManager):
    """python-socketio's room bookkeeping, telling listeners which room's
    members changed (every join and leave goes through these two)."""

    def __init__(self):
        super().__init__()
        self.route_listeners: list = []

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._changed(room)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        self._changed(room)

    def _changed(self, room) -> None:
        if room is None:
            return  # the namespace's map of every socket, never broadcast to
        for listener in self.route_listeners:
            listener(room)


class RecordsSocketServer(socketio.AsyncServer):
    """`connect_handler(eio_sid, auth)` performs the whole CONNECT handshake."""

    def __init__(self, *args, connect_handler=None, **kwargs):
        kwargs.setdefault("client_manager", RecordsManager())
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
