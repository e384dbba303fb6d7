"""HTTP/1.1 of the records port, for uvicorn (`uvicorn.Config(http=...)`),
served here in full: Engine.IO long-polling in the protocol itself; other
requests (/healthz, /readyz, /metrics, the playground) by the service's ASGI
application through asgihttp.py; an engine.io websocket upgrade accepted
here and the connection adopted by the websocket protocol class given to
`serving`, any other upgrade handed to it bytes and all (no uvicorn class
is involved, only uvicorn's protocol-class contract: the constructor,
`server_state.connections`/`tasks`, `shutdown()`).

Served here, a held GET costs no task and no ASGI messages: the session's
waiter is this connection, and the broadcast that sends to the session
writes the response, once per recipient, from inside its loop. Parsing is
httptools (llhttp), the parser uvicorn uses. Responses go out in request
order: requests pipelined behind an application's response wait for it
(reading pauses meanwhile); anything pipelined behind a held long-poll, or
a long-poll behind an application's response, closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools
from channels_common.closecodes import NORMAL
from channels_common.httphead import HeadGuard, expire_head
from channels_common.tasks import spawn
from channels_common.wshandshake import Refusal, accept_response, check_upgrade, refusal_response

from . import engineio as eio
from .asgihttp import MAX_BODY_BYTES, Exchange, http_scope
from .polling import TEXT_PLAIN, Get, Polling, Post, Reply

log = logging.getLogger("channels.records.http")

SOCKET_IO_PATH = b"/socket.io/"
WEBSOCKET_PATHS = (b"/socket.io/", b"/socket.io")
REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 413: b"Payload Too Large"}
# Bytes of one request's head (line and headers) at most.
MAX_HEAD_BYTES = 64 * 1024
# As uvicorn's default: a keep-alive connection idle this long is closed.
KEEP_ALIVE_SECONDS = 5.0


class IdleSweep:
    """Closes a server's connections once idle for `seconds` (within a
    further `seconds / TICKS`): one timer for all of them, where a timer per
    response cost ~4 % of the CPU of serving long-polls. A connection notes
    `tick` whenever it reads or answers; idle means nothing held, in flight
    or half-read."""

    TICKS = 5

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.tick = 0
        self.members: set[RecordsHttpProtocol] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, conn: RecordsHttpProtocol) -> None:
        self.members.add(conn)
        if self.timer is None:
            self.timer = conn.loop.call_later(self.seconds / self.TICKS, self._sweep, conn.loop)

    def discard(self, conn: RecordsHttpProtocol) -> None:
        self.members.discard(conn)

    def _sweep(self, loop) -> None:
        self.tick += 1
        stale = self.tick - self.TICKS
        for conn in [c for c in self.members if c.active_tick < stale and c.idle()]:
            conn.transport.close()
        self.timer = loop.call_later(self.seconds / self.TICKS, self._sweep, loop) if self.members else None


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
    # What the protocol serves, for one service (see `serving`).
    polling: Polling | None = None
    app = None
    websocket_class: type | None = None
    engine_websockets = None  # websocket.WebSockets: engine.io upgrades accepted here
    idle_sweep: IdleSweep  # one per server (see `serving`)
    head_guard: HeadGuard  # the request-head deadline and bound, one per server

    @classmethod
    def serving(
        cls,
        polling: Polling | None,
        *,
        app,
        websocket: type | None = None,
        engine_websockets=None,
        keep_alive_seconds: float = KEEP_ALIVE_SECONDS,
        head_guard: HeadGuard | None = None,
    ) -> type[RecordsHttpProtocol]:
        """The protocol class to give uvicorn for one service: long-polling
        decided by `polling`, other requests served by the ASGI `app`, a
        websocket upgrade handed to `websocket`, a protocol class with
        uvicorn's constructor (config, server_state, app_state) that reads
        the request itself (None: upgrades are served as plain requests).
        With `engine_websockets` (websocket.WebSockets), an upgrade to
        /socket.io/ is accepted here from the request already read: the
        websocket protocol only adopts the connection (LeanWebSocketProtocol's
        `adopt` and `accept_detached`). `head_guard` closes requests whose
        head takes too long (default: 10 s, 5,000 at once)."""
        return type(cls.__name__, (cls,), {
            "polling": polling, "app": staticmethod(app), "websocket_class": websocket,
            "engine_websockets": engine_websockets, "idle_sweep": IdleSweep(keep_alive_seconds),
            "head_guard": HeadGuard(10.0, 5000) if head_guard is None else head_guard,
        })

    def __init__(self, config, server_state, app_state=None, _loop=None):
        self.config = config
        self.server_state = server_state
        self.app_state = app_state if app_state is not None else {}
        self.loop = _loop or asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.secure = False
        # Bytes of the current request (and what follows), in case it is an upgrade.
        self.buffer = bytearray()
        self.buffering = True  # until the current request is known to be served here
        self.in_message = False
        self.completed = 0  # requests finished within the current data_received
        self.mixed = False  # the buffer holds an earlier request's bytes too
        self.upgrade = False
        self.handed_off = False
        self.keep_alive = True
        self.active_tick = 0
        self.write_paused = False
        self.read_paused = False
        self.held: _Held | None = None
        self.exchange: Exchange | None = None  # the application's request in flight
        self.waiting: deque[Exchange] = deque()  # pipelined behind it
        self.closing_after = False  # close once the response in flight is written
        self._cors_key = None
        self._cors = b""  # the CORS header lines for that key
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_list: list[tuple[bytes, bytes]] = []
        self.reply: Reply | None = None
        self.get = None
        self.post = None
        self.body: bytearray | None = None
        self.too_large = False
        self.to_app = False
        self.ignored = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.secure = transport.get_extra_info("sslcontext") is not None
        self.server_state.connections.add(self)
        self.active_tick = self.idle_sweep.tick
        self.idle_sweep.add(self)
        self.head_guard.begin(self)

    def connection_lost(self, exc) -> None:
        self.server_state.connections.discard(self)
        self.idle_sweep.discard(self)
        self.head_guard.end(self)
        self.waiting.clear()
        if self.exchange is not None:
            self.exchange.lost()
        held, self.held = self.held, None
        if held is not None and not held.answered:
            held.answered = True
            if held.sock.waiter is held:
                held.sock.waiter = None
            # As engine.io: a long-poll cut before its answer ends the session.
            held.sock.close(eio.TRANSPORT_ERROR, notify_client=False)

    def data_received(self, data: bytes) -> None:
        self.active_tick = self.idle_sweep.tick
        if not self.in_message:
            self.buffer.clear()
            self.buffering = True
            self.mixed = False
        if self.buffering:
            self.buffer += data
        self.completed = 0
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self.upgrade:
                    self._hand_off(data[exc.args[0]:] if exc.args else b"")
                    return
                # An upgrade we do not do (h2c...) was served as a plain
                # request, as a server may (RFC 9110 7.8): read on.
                data = data[exc.args[0]:] if exc.args else b""
                if data:
                    continue
            except httptools.HttpParserCallbackError:
                log.exception("serving an http request failed")
                self._refuse_and_close()
                return
            except httptools.HttpParserError as exc:
                log.warning("bad http request from client, refused", extra={"error": str(exc)})
                self._refuse_and_close()
                return
            break
        if self.in_message and self.buffering and len(self.buffer) > MAX_HEAD_BYTES:
            log.warning("http request head from client too large, refused")
            self._refuse_and_close()

    def pause_writing(self) -> None:
        # The client is not reading its responses: read no further requests
        # (so none is answered) until it does. TCP backpressure, not buffering.
        self.write_paused = True
        self._pause_reading()
        if self.exchange is not None:
            self.exchange.unwritable()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.writable()
        self._resume_reading()

    def shutdown(self) -> None:
        """uvicorn is stopping: a held poll is answered (the sessions were
        closed first: it carries their CLOSE), an application's response
        in flight ends the connection, idle connections close."""
        self.keep_alive = False
        held = self.held
        if held is not None:
            held.set_result(None)
        elif self.exchange is not None:
            self.exchange.keep_alive = False
        elif not self.in_message:
            self.transport.close()

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_guard.begin(self)
        self.in_message = True
        if self.completed:
            self.mixed = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers[name] = value
        self.header_list.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_guard.end(self)
        parser = self.parser
        if (parser.should_upgrade() and self.websocket_class is not None
                and self.headers.get(b"upgrade", b"").lower() == b"websocket"):
            self.upgrade = True  # handed off once httptools stops at it
            return
        # Served here: nothing of it will be handed over, so nothing is kept.
        self.buffering = False
        self.buffer.clear()
        busy = self.held is not None or self.exchange is not None
        path, _, query = self.url.partition(b"?")
        if path != SOCKET_IO_PATH or self.polling is None:
            self.to_app = True
            if self.closing_after or (self.held is not None):
                self._ignore("request pipelined behind a long-poll, connection closed")
                return
            self.body = bytearray()
            if self.headers.get(b"expect", b"").lower() == b"100-continue" and not busy:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        if busy or self.closing_after:
            self._ignore("long-poll pipelined behind another response, connection closed")
            return
        self.keep_alive = self.keep_alive and parser.should_keep_alive()
        method = parser.get_method().decode("latin-1")
        polling = self.polling
        decision = polling.route(method, query, self.headers, self.secure)
        key = (method, self.headers.get(b"origin"), self.headers.get(b"access-control-request-headers"))
        if key != self._cors_key:
            self._cors_key = key
            self._cors = b"".join(
                b"%b: %b\r\n" % header for header in polling.cors.headers(method, self.headers, self.secure)
            )
        if isinstance(decision, Reply):
            if decision.status == 413:
                # Refused from its Content-Length: answered now, not once a
                # body nobody keeps has all arrived (llhttp skips it).
                self._write(decision.status, decision.body, decision.content_type)
                self.ignored = True
                return
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
        if self.body is None or self.too_large:
            return
        limit = MAX_BODY_BYTES if self.to_app else self.polling.max_payload
        if len(self.body) + len(body) > limit:
            self.too_large = True
            return
        self.body += body

    def on_message_complete(self) -> None:
        self.in_message = False
        self.completed += 1
        if self.upgrade or self.ignored:
            return
        if self.to_app:
            self._app_request()
            return
        polling = self.polling
        if self.reply is not None:
            reply = self.reply
            refused = reply.status == 400 and polling.cors.refuses(self.headers, self.secure)
            self._write(reply.status, reply.body, reply.content_type, cors=not refused)
        elif self.post is not None:
            sock, self.post = self.post, None
            sock.posting = False
            body, self.body = self.body, None
            reply = polling.too_large() if self.too_large else polling.posted(sock, bytes(body))
            self._write(reply.status, reply.body, reply.content_type)
        elif self.get is not None:
            sock, self.get = self.get, None
            if Polling.ready(sock):
                self._write(200, Polling.answer_body(sock), TEXT_PLAIN)
            else:
                # Held. Reading goes on (pausing and resuming it for every
                # poll cost ~3 % of polling CPU): no client sends more on a
                # connection whose request is unanswered, one that does is
                # closed (on_headers_complete), and a client that hangs up
                # is seen at once and its session ends, as in engine.io.
                self.held = held = _Held(self, sock)
                sock.waiter = held

    def _ignore(self, why: str) -> None:
        """The current request is not served: the connection ends once the
        response in flight is written."""
        if not self.closing_after:
            log.info(why)
        self.ignored = True
        self.closing_after = True
        self.waiting.clear()
        self._pause_reading()

    # -- the application's requests ------------------------------------------------

    def _app_request(self) -> None:
        parser = self.parser
        body, self.body = self.body, None
        keep_alive = self.keep_alive and parser.should_keep_alive()
        if self.too_large:
            log.warning("http request body over the size limit, refused", extra={"limit": MAX_BODY_BYTES})
            if self.exchange is None:
                self._close_with(413, b"Payload Too Large")
            else:
                self._ignore("http request body over the size limit")
            return
        scope = http_scope(
            parser.get_method().decode("latin-1"), self.url, self.header_list,
            parser.get_http_version(), self.transport, self.secure, self.app_state.copy(),
        )
        exchange = Exchange(self.app, scope, bytes(body), self.transport, keep_alive, self._app_done)
        if self.exchange is None:
            self._start_exchange(exchange)
        else:
            self.waiting.append(exchange)

    def _start_exchange(self, exchange: Exchange) -> None:
        self.exchange = exchange
        # One response at a time: nothing more is read until it is written.
        self._pause_reading()
        if self.write_paused:
            exchange.unwritable()
        spawn(exchange.run(), tasks=self.server_state.tasks, loop=self.loop)

    def _app_done(self, keep_alive: bool) -> None:
        self.exchange = None
        transport = self.transport
        if transport.is_closing():
            return
        if not keep_alive or not self.keep_alive or (self.closing_after and not self.waiting):
            transport.close()
            return
        if self.waiting:
            self._start_exchange(self.waiting.popleft())
            return
        self._resume_reading()
        self.active_tick = self.idle_sweep.tick

    # -- responses -----------------------------------------------------------

    def _answer_held(self, held: _Held) -> None:
        if self.held is not held:
            return
        self.held = None
        if self.transport.is_closing():
            return
        self._write(200, Polling.answer_body(held.sock), TEXT_PLAIN)
        if self.closing_after:
            self.transport.close()
        else:
            self._resume_reading()

    def _write(self, status: int, body: bytes, content_type: bytes, cors: bool = True) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n%b%b\r\n%b" % (
            status, REASONS.get(status, b""), content_type, len(body), self._cors if cors else b"",
            b"" if self.keep_alive else b"connection: close\r\n", body,
        ))
        if not self.keep_alive:
            transport.close()
        self.active_tick = self.idle_sweep.tick

    def _close_with(self, status: int, text: bytes) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b" % (status, text, len(text), text)
        )
        self.transport.close()

    def _refuse_and_close(self) -> None:
        """A 400, then the connection ends. Behind a response still to be
        written (a held poll, an application's), nothing goes ahead of it:
        the connection ends once it is written."""
        if self.held is not None or self.exchange is not None:
            self.closing_after = True
            self._pause_reading()
            return
        self._close_with(400, b"Bad Request")

    # -- reading and idling ------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if (self.read_paused and self.held is None and self.exchange is None and not self.write_paused
                and not self.closing_after and not self.transport.is_closing()):
            self.read_paused = False
            self.transport.resume_reading()

    def head_expired(self, cause: str) -> None:
        """The head guard's verdict: too slow a head, or too many at once."""
        expire_head(self.transport)

    def idle(self) -> bool:
        return (self.held is None and self.exchange is None and not self.in_message
                and not self.transport.is_closing())

    # -- the websocket upgrade -------------------------------------------------------

    def _hand_off(self, rest: bytes) -> None:
        """`rest`: what followed the request's head in the last read."""
        if self.handed_off:
            return
        self.handed_off = True
        if self.mixed or self.held is not None or self.exchange is not None:
            # Bytes of a request served here precede it (pipelining):
            # they cannot be replayed to another protocol.
            log.info("websocket upgrade pipelined behind another request, refused")
            self._refuse_and_close()
            return
        self.server_state.connections.discard(self)
        self.idle_sweep.discard(self)
        protocol = self.websocket_class(config=self.config, server_state=self.server_state, app_state=self.app_state)
        path, _, query_string = self.url.partition(b"?")
        if self.engine_websockets is not None and path in WEBSOCKET_PATHS:
            self._accept_engineio(protocol, query_string, rest)
            return
        # Straight to the websocket protocol, which reads the request itself.
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        data, self.buffer = bytes(self.buffer), bytearray()
        protocol.data_received(data)

    def _accept_engineio(self, protocol, query_string: bytes, rest: bytes) -> None:
        """An engine.io websocket, accepted from the request as read here
        (a second parse and the ASGI round were ~15 % of a connect's CPU);
        refusals as LeanWebSocketProtocol answers them."""
        self.buffer = bytearray()
        transport = self.transport
        parser = self.parser
        if parser.get_method() != b"GET" or parser.get_http_version() != "1.1":
            checked = Refusal(400, "not a GET HTTP/1.1 request")
        else:
            checked = check_upgrade(self.header_list)
        if isinstance(checked, Refusal):
            log.warning("bad websocket handshake", extra={"status": checked.status, "reason": checked.reason})
            self._refuse_upgrade(checked)
            return
        key = checked[0]
        websockets = self.engine_websockets
        query = websockets.admit(query_string, self.headers, self.secure)
        if query is None:
            self._refuse_upgrade(Refusal(403, ""))
            return
        protocol.adopt(transport)
        attached = websockets.attach(query, query_string, protocol)
        response = accept_response(key, self.server_state.default_headers)
        if attached is None:  # a session already upgrading: accepted, then closed
            protocol.accept_detached(response, _ignore_message, _ignore_message)
            protocol.close(NORMAL)
            return
        first, handler = attached
        protocol.accept_detached(response + first, handler.on_message, handler.on_close, rest)

    def _refuse_upgrade(self, refusal: Refusal) -> None:
        self.transport.write(refusal_response(refusal.status, refusal.reason, refusal.extra_headers))
        self.transport.close()


def _ignore_message(_arg) -> None:
    pass
