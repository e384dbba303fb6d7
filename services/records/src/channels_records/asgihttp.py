"""One HTTP/1.1 request served by an ASGI application (/healthz, /readyz,
/metrics, the playground): the request's body is read whole (bounded)
before the application runs; the response is written with its own
Content-Length, or chunked when the application gives none.

`Exchange` is the ASGI side of one request; the connection that parsed it
(httpserver.py) owns the transport and is told when the response is done.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from urllib.parse import unquote

log = logging.getLogger("channels.records.http")

# The bodies these endpoints take are small (the playground's publish form
# is at most 64 KiB): anything larger is refused, not buffered.
MAX_BODY_BYTES = 1024 * 1024
# Statuses whose responses carry no body (RFC 9110 6.4.1).
_NO_BODY = {204, 304}


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 " + str(status).encode() + b" " + reason(status) + b"\r\n"


def _address(info):
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def http_scope(method: str, target: bytes, headers: list[tuple[bytes, bytes]], http_version: str,
               transport, secure: bool, state: dict) -> dict:
    """The ASGI `http` scope of a request (header names lower-case)."""
    path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "server": _address(transport.get_extra_info("sockname")),
        "client": _address(transport.get_extra_info("peername")),
        "scheme": "https" if secure else "http",
        "method": method,
        "root_path": "",
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "state": state,
    }


class Exchange:
    """The application's view of one request: `receive` gives the body
    once, then waits for the client to go; `send` writes the response.
    `done(keep_alive)` is called once, when the connection may go on to
    the next request (False: it must close)."""

    __slots__ = (
        "_body_given",
        "_drain",
        "_gone",
        "app",
        "body",
        "chunked",
        "complete",
        "disconnected",
        "done",
        "head",
        "keep_alive",
        "scope",
        "started",
        "status",
        "transport",
    )

    def __init__(self, app, scope: dict, body: bytes, transport, keep_alive: bool, done):
        self.app = app
        self.scope = scope
        self.body = body
        self.transport = transport
        self.keep_alive = keep_alive
        self.done = done
        self.head = scope["method"] == "HEAD"
        self.started = False
        self.status = 0
        self.complete = False
        self.chunked = False
        self.disconnected = False
        self._body_given = False
        self._gone: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._finish(False)
                raise
            log.exception("http request failed in the application",
                          extra={"path": self.scope["path"], "method": self.scope["method"]})
            if not self.started and not self.disconnected:
                self._error_response()
            else:
                self._finish(False)  # half a response: only closing ends it
            return
        if not self.complete:
            if not self.started and not self.disconnected:
                log.error("the application returned without a response",
                          extra={"path": self.scope["path"], "method": self.scope["method"]})
                self._error_response()
            else:
                self._finish(False)

    # -- the connection tells --------------------------------------------------

    def lost(self) -> None:
        """The client went away."""
        self.disconnected = True
        for fut in (self._gone, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def writable(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def unwritable(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    # -- ASGI ------------------------------------------------------------------

    async def receive(self) -> dict:
        if not self._body_given and not self.disconnected:
            self._body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not self.disconnected and not self.complete:
            if self._gone is None:
                self._gone = asyncio.get_running_loop().create_future()
            await self._gone
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if self.disconnected:
            return  # as uvicorn: what is sent after the client left goes nowhere
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self._start(int(message["status"]), message.get("headers") or ())
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            self._body(body, more)
            if not more:
                self.complete = True
                self._finish(self.keep_alive)
            elif self._drain is not None and not self._drain.done():
                await self._drain
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} for an http request")

    # -- writing ---------------------------------------------------------------

    def _start(self, status: int, headers) -> None:
        self.started = True
        self.status = status
        parts = [status_line(status)]
        has_length = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue  # ours to write, once, below
            if lname == b"transfer-encoding":
                continue  # ours to decide
            has_length = has_length or lname == b"content-length"
            parts += [name, b": ", value, b"\r\n"]
        if not has_length and not self.head and status not in _NO_BODY:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def _body(self, body: bytes, more: bool) -> None:
        if self.head or self.status in _NO_BODY:
            return
        if self.chunked:
            if body:
                self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
            if not more:
                self.transport.write(b"0\r\n\r\n")
        elif body:
            self.transport.write(body)

    def _error_response(self) -> None:
        self.started = self.complete = True
        self.transport.write(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
        )
        self._finish(False)

    def _finish(self, keep_alive: bool) -> None:
        done, self.done = self.done, None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        if done is not None:
            done(keep_alive)
