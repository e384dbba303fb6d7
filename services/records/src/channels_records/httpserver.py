"""HTTP/1.1 of the records port, for uvicorn (`uvicorn.Config(http=...)`):
Engine.IO long-polling is served in the protocol itself; anything else
(the websocket upgrade, /healthz, /readyz, /metrics, the playground) is
handed, bytes and all, to uvicorn's own httptools protocol (a websocket
upgrade of /socket.io/ straight to the configured websocket protocol), as
uvicorn itself hands an upgrade to its websocket protocol.

Served here, a held GET costs no task and no ASGI messages: the session's
waiter is this connection, and the broadcast that sends to the session
writes the response, once per recipient, from inside its loop. Parsing is
httptools (llhttp), the parser uvicorn uses.
"""

from __future__ import annotations

import asyncio
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import engineio as eio
from .polling import Get, Polling, Post, Reply

log = logging.getLogger("channels.records.http")

SOCKET_IO_PATH = b"/socket.io/"
REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 413: b"Payload Too Large"}
# Bytes of one request's head (line and headers) at most.
MAX_HEAD_BYTES = 64 * 1024


class _Held:
    """A held long-poll, as the session sees it (the `waiter` interface of
    sockets.EngineSocket): waking it writes the response at once."""

    __slots__ = ("answered", "protocol", "sock")

    def __init__(self, protocol: RecordsHttpProtocol, sock):
        self.protocol = protocol
        self.sock = sock
        self.answered = False

    def done(self) -> bool:
        return self.answered

    def set_result(self, _value) -> None:
        if self.answered:
            return
        self.answered = True
        if self.sock.waiter is self:
            self.sock.waiter = None
        self.protocol._answer_held(self)


class RecordsHttpProtocol(asyncio.Protocol):
    # The long-polling decisions of the service this protocol serves (see `serving`).
    polling: Polling | None = None

    @classmethod
    def serving(cls, polling: Polling) -> type[RecordsHttpProtocol]:
        """The protocol class to give uvicorn for one service."""
        return type(cls.__name__, (cls,), {"polling": polling})

    def __init__(self, config, server_state, app_state=None, _loop=None):
        self.config = config
        self.server_state = server_state
        self.app_state = app_state if app_state is not None else {}
        self.loop = _loop or asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.secure = False
        # Bytes of the current request (and what follows), in case it goes to uvicorn.
        self.buffer = bytearray()
        self.buffering = True  # until the current request is known to be served here
        self.in_message = False
        self.completed = 0  # requests finished within the current data_received
        self.mixed = False  # the buffer holds an earlier request's bytes too
        self.foreign = False
        self.upgrade = False
        self.handed_off = False
        self.keep_alive = True
        self.idle_timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.held: _Held | None = None
        self._cors_key = None
        self._cors: list[tuple[bytes, bytes]] = []
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.reply: Reply | None = None
        self.get = None
        self.post = None
        self.body: bytearray | None = None
        self.too_large = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.secure = transport.get_extra_info("sslcontext") is not None
        self.server_state.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server_state.connections.discard(self)
        self._cancel_idle()
        held, self.held = self.held, None
        if held is not None and not held.answered:
            held.answered = True
            if held.sock.waiter is held:
                held.sock.waiter = None
            # As engine.io: a long-poll cut before its answer ends the session.
            held.sock.close(eio.TRANSPORT_ERROR, notify_client=False)

    def data_received(self, data: bytes) -> None:
        self._cancel_idle()
        if not self.in_message:
            self.buffer.clear()
            self.buffering = True
            self.mixed = False
        if self.buffering:
            self.buffer += data
        self.completed = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the upgrade request is foreign: handed off below
        except httptools.HttpParserCallbackError:
            log.exception("serving a long-polling request failed")
            self._refuse_and_close()
            return
        except httptools.HttpParserError as exc:
            log.warning("bad http request from client, refused", extra={"error": str(exc)})
            self._refuse_and_close()
            return
        if self.foreign:
            self._hand_off()
        elif self.in_message and self.buffering and len(self.buffer) > MAX_HEAD_BYTES:
            log.warning("http request head from client too large, refused")
            self._refuse_and_close()

    def pause_writing(self) -> None:
        # The client is not reading its responses: read no further requests
        # (so none is answered) until it does. TCP backpressure, not buffering.
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.held is None and not self.transport.is_closing():
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """uvicorn is stopping: a held poll is answered (the sessions were
        closed first: it carries their CLOSE), idle connections close."""
        self.keep_alive = False
        held = self.held
        if held is not None:
            held.set_result(None)
        elif not self.in_message:
            self.transport.close()

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        if self.completed:
            self.mixed = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        if self.foreign:
            return
        path, _, query = self.url.partition(b"?")
        if path != SOCKET_IO_PATH or self.parser.should_upgrade() or self.polling is None:
            self.foreign = True
            self.upgrade = path == SOCKET_IO_PATH and self.parser.should_upgrade()
            return
        # Served here: nothing of it will be handed over, so nothing is kept.
        self.buffering = False
        self.buffer.clear()
        self.keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method().decode("latin-1")
        polling = self.polling
        decision = polling.route(method, query, self.headers, self.secure)
        key = (method, self.headers.get(b"origin"), self.headers.get(b"access-control-request-headers"))
        if key != self._cors_key:
            self._cors_key = key
            self._cors = polling.cors.headers(method, self.headers, self.secure)
        if isinstance(decision, Reply):
            self.reply = decision
        elif isinstance(decision, Get):
            self.get = decision.sock
        elif isinstance(decision, Post):
            self.post = decision.sock
            self.post.posting = True
            self.body = bytearray()
            if self.headers.get(b"expect", b"").lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.foreign or self.body is None or self.too_large:
            return
        if len(self.body) + len(body) > self.polling.max_payload:
            self.too_large = True
            return
        self.body += body

    def on_message_complete(self) -> None:
        self.in_message = False
        self.completed += 1
        if self.foreign:
            return
        polling = self.polling
        if self.reply is not None:
            refused = self.reply.status == 400 and polling.cors.refuses(self.headers, self.secure)
            self._write(self.reply, cors=not refused)
        elif self.post is not None:
            sock, self.post = self.post, None
            sock.posting = False
            body, self.body = self.body, None
            self._write(polling.too_large() if self.too_large else polling.posted(sock, bytes(body)))
        elif self.get is not None:
            sock, self.get = self.get, None
            if Polling.ready(sock):
                self._write(Polling.answer(sock))
            else:
                # Held: no further request is read from this connection
                # until it is answered (TCP backpressure, no pipelining).
                self.held = held = _Held(self, sock)
                sock.waiter = held
                self.transport.pause_reading()

    # -- responses -----------------------------------------------------------

    def _answer_held(self, held: _Held) -> None:
        if self.held is not held:
            return
        self.held = None
        if self.transport.is_closing():
            return
        self._write(Polling.answer(held.sock))
        if not self.transport.is_closing() and not self.write_paused:
            self.transport.resume_reading()

    def _write(self, reply: Reply, cors: bool = True) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        parts = [
            b"HTTP/1.1 ", str(reply.status).encode(), b" ", REASONS.get(reply.status, b""),
            b"\r\ncontent-type: ", reply.content_type,
            b"\r\ncontent-length: ", str(len(reply.body)).encode(), b"\r\n",
        ]
        if cors:
            for name, value in self._cors:
                parts += [name, b": ", value, b"\r\n"]
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", reply.body]
        transport.write(b"".join(parts))
        if not self.keep_alive:
            transport.close()
        elif self.held is None:
            self._start_idle()

    def _refuse_and_close(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n"
            b"connection: close\r\n\r\nBad Request"
        )
        self.transport.close()

    def _start_idle(self) -> None:
        # As uvicorn: a keep-alive connection with no next request is closed.
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(self.config.timeout_keep_alive, self._idle)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if self.held is None and not self.in_message and not self.transport.is_closing():
            self.transport.close()

    # -- everything else goes to uvicorn ---------------------------------------

    def _hand_off(self) -> None:
        if self.handed_off:
            return
        self.handed_off = True
        if self.mixed or self.held is not None:
            # Bytes of a request served here precede it (pipelining):
            # they cannot be replayed to another protocol.
            log.info("foreign request pipelined behind a long-poll, refused")
            self._refuse_and_close()
            return
        self.server_state.connections.discard(self)
        ws_class = getattr(self.config, "ws_protocol_class", None)
        if self.upgrade and ws_class is not None:
            # Straight to the websocket protocol, as uvicorn's own would
            # hand it over, without parsing the request a second time.
            protocol = ws_class(config=self.config, server_state=self.server_state, app_state=self.app_state)
        else:
            protocol = HttpToolsProtocol(
                config=self.config, server_state=self.server_state, app_state=self.app_state, _loop=self.loop
            )
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        data, self.buffer = bytes(self.buffer), bytearray()
        protocol.data_received(data)
