"""A lean ASGI WebSocket protocol for uvicorn (`uvicorn.Config(ws=...)`).

uvicorn's own websocket protocols keep an asyncio.Queue, events, a
keepalive timer and the websockets library's connection state per client;
with thousands of idle clients that is most of the service's memory. This
one keeps a frame parser (wsframe.py), a short inbox and a waiter, and
exposes `transport` for the broadcast fast path. It runs no task besides
the ASGI application's and no timer per socket: an application that wants
RFC 6455 keep-alive pings (collab) runs one `KeepAlive` sweep over its
sockets; records relies on Engine.IO's own pings.
"""

from __future__ import annotations

import asyncio
import logging
import select
from urllib.parse import unquote

from . import closecodes, wsframe
from .tasks import spawn
from .wshandshake import (
    MAX_REQUEST_BYTES,
    Refusal,
    accept_response,
    parse_upgrade,
    refusal_response,
    response_head,
)

log = logging.getLogger("channels.websocket")

CLOSE_TIMEOUT = 5.0
# Messages a client may have waiting before its socket stops being read.
MAX_INBOX = 16
# The pause reason of the protocol's own inbox (see pause_reading).
_INBOX = "inbox"

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)
_DENYING = 4  # an HTTP response instead of the upgrade, its body still to come

# An ASGI extension of this protocol: once accepted, an application may send
# {"type": DETACH, "on_message": f(str | bytes), "on_close": f(code)} and
# return; the connection stays open and is served by those callbacks, so an
# idle client keeps no task or coroutine stack. The protocol is `send.__self__`:
# its `transport` takes frames (wsframe.py) and `close(code, reason)` ends it.
DETACH = "channels.websocket.detach"
# Another: a "websocket.accept" message may carry {FIRST_FRAMES: bytes},
# pre-encoded frames (wsframe.py) written in the same write as the 101
# response, so a server that speaks first costs the client one segment.
FIRST_FRAMES = "channels.websocket.first_frames"
# ASGI's denial response: before accepting, an application may send
# "websocket.http.response.start" (status, headers), then
# "websocket.http.response.body" messages, instead of the upgrade.
HTTP_RESPONSE = "websocket.http.response"
_EXTENSIONS = {DETACH: {}, HTTP_RESPONSE: {}, FIRST_FRAMES: {}}


def _address(info):
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


class LeanWebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        "_close_timer",
        "_head",
        "_inbox",
        "_on_close",
        "_on_message",
        "_parser",
        "_pause_reasons",
        "_state",
        "_waiter",
        "accepted",
        "app_state",
        "config",
        "heard",
        "keepalive_ping_at",
        "keepalive_quiet_since",
        "key",
        "loop",
        "read_paused",
        "scope",
        "server_state",
        "task",
        "transport",
    )

    def __init__(self, config, server_state, app_state, _loop=None):
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.scope = None
        self.task = None
        self.key = b""
        self.accepted = False
        self.read_paused = False
        self._pause_reasons: set[str] | None = None
        # Keep-alive bookkeeping (see KeepAlive): `heard` is set by every read.
        self.heard = False
        self.keepalive_quiet_since: float | None = None
        self.keepalive_ping_at: float | None = None
        self._state = _HANDSHAKE
        self._head = b""
        self._parser: wsframe.FrameParser | None = None
        self._inbox: list = []  # rarely more than one event: a list is the smaller
        self._waiter: asyncio.Future | None = None
        self._close_timer = None
        self._on_message = None
        self._on_close = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server_state.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server_state.connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._state != _CLOSED:
            self._finish(closecodes.ABNORMAL)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self._state == _HANDSHAKE:
            self._handshake_data(data)
        elif self._state != _CLOSED and self._parser is not None:
            self._frames(data)

    def eof_received(self):
        return None  # the transport closes itself

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client the service restarts."""
        if self._state == _OPEN:
            self.transport.write(wsframe.close_frame(closecodes.SERVICE_RESTART))
            self._finish(closecodes.SERVICE_RESTART)
        elif self._state == _HANDSHAKE and self.scope is None:
            self._finish(closecodes.ABNORMAL)
        self.transport.close()

    # -- an upgrade read by another protocol -------------------------------------

    def adopt(self, transport) -> None:
        """Take over a connection whose upgrade request another protocol
        has read (and accepts): the next call must be `accept_detached`."""
        self.connection_made(transport)
        transport.set_protocol(self)

    def accept_detached(self, response: bytes, on_message, on_close, data: bytes = b"") -> None:
        """Answer the adopted upgrade with `response` (the 101 and any first
        frames) and serve the socket by callbacks, as after DETACH; `data`
        (bytes that came after the request) is read as frames."""
        self.transport.write(response)
        self.accepted = True
        self._state = _OPEN
        self._parser = wsframe.FrameParser(self.config.ws_max_size)
        self._on_message, self._on_close = on_message, on_close
        if data:
            self._frames(data)

    # -- incoming --------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        if self.scope is not None:
            return  # the application has not answered yet; a client must wait
        # Only what arrived since the last read is searched (with the three
        # bytes before it): a request sent a byte at a time costs linear work.
        buffered = self._head
        if buffered:
            start = max(0, len(buffered) - 3)
            buffered += data
            end = buffered.find(b"\r\n\r\n", start)
        else:
            end = data.find(b"\r\n\r\n")
        if end < 0:
            if not buffered:
                self._head = buffered = bytearray(data)
            if len(buffered) > MAX_REQUEST_BYTES:
                self._refuse(Refusal(400, "request too large"))
            return
        if end > MAX_REQUEST_BYTES:  # the same limit however the head arrived
            self._refuse(Refusal(400, "request too large"))
            return
        head = bytes(buffered[:end]) if buffered else data[:end]
        self._head = b""
        request = parse_upgrade(head)
        if isinstance(request, Refusal):
            log.warning("bad websocket handshake", extra={"status": request.status, "reason": request.reason})
            self._refuse(request)
            return
        self.key = request.key
        path, _, query = request.target.partition(b"?")
        root = self.config.root_path
        transport = self.transport
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": _address(transport.get_extra_info("sockname")),
            "client": _address(transport.get_extra_info("peername")),
            "root_path": root,
            "path": root + unquote(path.decode("latin-1")),
            "raw_path": root.encode("ascii") + path,
            "query_string": query,
            "headers": request.headers,
            "subprotocols": request.subprotocols,
            "state": self.app_state.copy(),
            "extensions": _EXTENSIONS,
        }
        self._inbox.append({"type": "websocket.connect"})
        self.task = spawn(self._run_asgi(), tasks=self.server_state.tasks, loop=self.loop)

    def _frames(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except wsframe.WebSocketProtocolError as exc:
            log.warning("websocket protocol error from client, closing", extra={"code": exc.code, "reason": exc.reason})
            if self._state == _OPEN:
                self.transport.write(wsframe.close_frame(exc.code, exc.reason))
            self._finish(exc.code)
            self.transport.close()
            return
        for event in events:
            if type(event) is wsframe.Message:
                if self._state != _OPEN:
                    continue  # after our close frame, data is dropped (RFC 6455 5.5.1)
                if self._on_message is not None:
                    self._callback(self._on_message, event.data)
                elif type(event.data) is str:
                    self._deliver({"type": "websocket.receive", "text": event.data})
                else:
                    self._deliver({"type": "websocket.receive", "bytes": event.data})
            elif type(event) is wsframe.Ping:
                if self._state == _OPEN:
                    self.transport.write(wsframe.pong_frame(event.payload))
            else:  # Close
                if self._state == _OPEN:
                    # Echo the code (RFC 6455 5.5.1); 1005 is never sent.
                    self.transport.write(wsframe.close_frame(event.code if event.code != closecodes.NO_STATUS else closecodes.NORMAL))
                self._finish(event.code, event.reason)
                self.transport.close()
                return
        if len(self._inbox) >= MAX_INBOX:
            self.pause_reading(_INBOX)

    def _deliver(self, event) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(event)
        else:
            self._inbox.append(event)

    def _finish(self, code: int, reason: str = "") -> None:
        """The connection is over for the application (once)."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._parser = None
        if self._on_close is not None:
            on_close, self._on_message, self._on_close = self._on_close, None, None
            self._callback(on_close, code)
        else:
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})

    @staticmethod
    def _callback(fn, arg) -> None:
        try:
            fn(arg)
        except Exception:
            log.exception("websocket callback failed")

    def _refuse(self, refusal: Refusal) -> None:
        self._state = _CLOSED
        self.transport.write(refusal_response(refusal.status, refusal.reason, refusal.extra_headers))
        self.transport.close()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake. A detached application calls this
        directly (no ASGI message, no coroutine); its `on_close` still runs
        once the client answers or is cut off, so it can let go of the socket."""
        if self._state != _OPEN:
            return
        self.transport.write(wsframe.close_frame(code, reason))
        self._state = _CLOSING
        # Whatever held reading back, the client's close frame must be read.
        self._pause_reasons = None
        self._apply_pause()
        # The client answers with its close frame; a silent one is cut off.
        self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    # -- flow control ----------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        """Stop reading the socket until every reason given has been
        resumed: TCP backpressure then holds the client back, and nothing it
        sent is refused. Reasons are independent (the inbox, pending auths,
        unacknowledged updates...); pausing twice for one reason is harmless."""
        if self._state in (_CLOSING, _CLOSED):
            return
        if self._pause_reasons is None:
            self._pause_reasons = {reason}
        else:
            self._pause_reasons.add(reason)
        self._apply_pause()

    def resume_reading(self, reason: str) -> None:
        if self._pause_reasons is not None:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons:
                self._pause_reasons = None
        self._apply_pause()

    def _apply_pause(self) -> None:
        paused = self._pause_reasons is not None
        if paused == self.read_paused or self.transport is None or self.transport.is_closing():
            return
        self.read_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- ASGI ------------------------------------------------------------------

    async def _run_asgi(self) -> None:
        try:
            await self.config.loaded_app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("exception in the websocket application")
            if not self.accepted and self._state == _HANDSHAKE:
                self._refuse(Refusal(500, "internal error"))
        else:
            if not self.accepted and self._state == _HANDSHAKE:
                self._refuse(Refusal(500, "no handshake answer"))
        if self._on_close is not None and self._state in (_OPEN, _CLOSING):
            # Detached: the callbacks serve the connection from now on, and
            # the finished task (its coroutine, its name) is not kept with it.
            self.scope = self.task = None
            return
        if self._state == _OPEN:
            self.transport.write(wsframe.close_frame(closecodes.NORMAL))
            self._state = _CLOSING
        if self._close_timer is None:
            self.transport.close()
        # Nothing of the application is kept once it is done.
        self.scope = self.task = None
        self._inbox.clear()

    async def receive(self):
        if self._inbox:
            event = self._inbox.pop(0)
            if self.read_paused and len(self._inbox) < MAX_INBOX // 2:
                self.resume_reading(_INBOX)
            return event
        if self._state == _CLOSED:
            return {"type": "websocket.disconnect", "code": closecodes.ABNORMAL, "reason": ""}
        self._waiter = self.loop.create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    async def send(self, message) -> None:
        kind = message["type"]
        if self._state == _HANDSHAKE:
            if kind == "websocket.accept":
                headers = [*self.server_state.default_headers, *message.get("headers", ())]
                response = accept_response(self.key, headers, message.get("subprotocol"))
                first = message.get(FIRST_FRAMES)
                self.transport.write(response + first if first else response)
                self.accepted = True
                self._state = _OPEN
                self._parser = wsframe.FrameParser(self.config.ws_max_size)
            elif kind == "websocket.close":
                self._finish(closecodes.ABNORMAL)
                self._refuse(Refusal(403, ""))
            elif kind == "websocket.http.response.start":
                headers = [*self.server_state.default_headers, *message.get("headers", ())]
                self.transport.write(response_head(int(message["status"]), headers))
                self._state = _DENYING
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} before the websocket handshake")
            return
        if self._state == _DENYING and kind == "websocket.http.response.body":
            self.transport.write(message.get("body", b""))
            if not message.get("more_body", False):
                self._finish(closecodes.ABNORMAL)
                self.transport.close()
            return
        if self._state != _OPEN:
            raise OSError("websocket closed")
        if kind == "websocket.send":
            data = message.get("bytes")
            if data is not None:
                self.transport.write(wsframe.binary_frame(data))
            else:
                self.transport.write(wsframe.text_frame(message["text"].encode("utf-8")))
        elif kind == DETACH:
            self._on_message, self._on_close = message["on_message"], message["on_close"]
            inbox, self._inbox = self._inbox, []
            for event in inbox:
                if event["type"] == "websocket.receive":
                    self._callback(self._on_message, event.get("text", event.get("bytes")))
        elif kind == "websocket.close":
            code = message.get("code", closecodes.NORMAL)
            reason = message.get("reason") or ""
            self._on_message = self._on_close = None
            self.close(code, reason)
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an open websocket")


# A peer's FIN (POLLRDHUP, Linux) or RST (POLLERR, POLLHUP), seen by poll
# even behind bytes not read yet.
_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def abort_hung_up(protocols: list[LeanWebSocketProtocol]) -> int:
    """Abort those of `protocols` whose reading is paused and whose peer
    has hung up; how many. While paused, the transport reads nothing, so a
    FIN or an RST waits unseen behind the unread bytes until a write fails;
    the owner's sweep calls this instead (one poll for all). An aborted
    socket reports connection_lost as usual, so its owner lets it go."""
    poller = select.poll()
    by_fd = {}
    for proto in protocols:
        transport = proto.transport
        if not proto.read_paused or transport is None or transport.is_closing():
            continue
        sock = transport.get_extra_info("socket")
        if sock is None:
            continue
        fd = sock.fileno()
        if fd < 0:
            continue
        by_fd[fd] = proto
        poller.register(fd, _HUNG_UP)
    if not by_fd:
        return 0
    gone = 0
    for fd, events in poller.poll(0):
        if events & _HUNG_UP and fd in by_fd:
            by_fd[fd].transport.abort()
            gone += 1
    return gone


class KeepAlive:
    """RFC 6455 keep-alive for open sockets, driven by the owner's periodic
    sweep (no timer per socket): a socket quiet for half a `period` is sent a
    ping, and one not heard from (a pong or any frame) for a whole `period`
    after that ping is dead; the owner closes it. So a live, quiet client is
    never closed, and a dead peer is found within about 1.5 periods plus the
    sweep interval. While we ourselves hold reading paused the peer's answer
    may be waiting unread: that time never counts against it."""

    __slots__ = ("period",)

    def __init__(self, period: float):
        self.period = period

    def dead(self, proto: LeanWebSocketProtocol, now: float) -> bool:
        """One socket's turn in the sweep: True when its peer stopped answering."""
        if proto._state != _OPEN:
            return False
        if proto.heard or proto.read_paused or proto.keepalive_quiet_since is None:
            proto.heard = False
            proto.keepalive_quiet_since = now
            proto.keepalive_ping_at = None
            return False
        ping_at = proto.keepalive_ping_at
        if ping_at is not None:
            return now - ping_at >= self.period
        if now - proto.keepalive_quiet_since >= self.period / 2:
            proto.keepalive_ping_at = now
            proto.transport.write(PING_FRAME)
        return False


PING_FRAME = wsframe.frame_header(wsframe.OP_PING, 0)
