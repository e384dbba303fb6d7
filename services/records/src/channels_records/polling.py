"""Engine.IO HTTP long-polling, and the CORS rules of the records port (one
allowed origin, with credentials).

A GET with no sid opens a session; a GET with one is answered at once with
what waits for the session, or held until something does (a PING comes
every ping interval). A POST carries client packets; its body is read as
the server delivers it, so a `Transfer-Encoding: chunked` body counts the
same as one with a Content-Length. Refusals carry engine.io's error codes.

`Polling` decides (no I/O); two servers use it: the records port's own
HTTP/1.1 protocol (httpserver.py), which answers a held GET from inside the
broadcast, and `AsgiPolling`, for requests that reach the ASGI application.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from . import engineio as eio
from .sockets import Engine, EngineSocket

log = logging.getLogger("channels.records.polling")

TEXT_PLAIN = b"text/plain; charset=UTF-8"
JSON = b"application/json"


class Cors:
    """`origin`: the one browser origin allowed. None: only the request's
    own origin (its Host, or what a proxy says it forwarded). `headers`
    are a request's, names lower-case: {name: value}."""

    def __init__(self, origin: str | None, credentials: bool = True):
        self.origin = origin
        self.credentials = credentials

    def _allowed(self, headers: dict[bytes, bytes], secure: bool) -> list[str]:
        if self.origin is not None:
            return [self.origin]
        host = headers.get(b"host")
        if host is None:
            return []
        host = host.decode("latin-1")
        scheme = "https" if secure else "http"
        allowed = [f"{scheme}://{host}"]
        proto, fwd_host = headers.get(b"x-forwarded-proto"), headers.get(b"x-forwarded-host")
        if proto is not None or fwd_host is not None:
            proto = (proto.decode("latin-1") if proto else scheme).split(",")[0].strip()
            fwd_host = (fwd_host.decode("latin-1") if fwd_host else host).split(",")[0].strip()
            allowed.append(f"{proto}://{fwd_host}")
        return allowed

    def refuses(self, headers: dict[bytes, bytes], secure: bool = False) -> bool:
        """An Origin header that is not allowed (no header: not a browser)."""
        origin = headers.get(b"origin")
        return bool(origin) and origin.decode("latin-1") not in self._allowed(headers, secure)

    def headers(self, method: str, headers: dict[bytes, bytes], secure: bool = False) -> list[tuple[bytes, bytes]]:
        out = []
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") in self._allowed(headers, secure):
            out.append((b"access-control-allow-origin", origin))
        if method == "OPTIONS":
            out.append((b"access-control-allow-methods", b"OPTIONS, GET, POST"))
        requested = headers.get(b"access-control-request-headers")
        if requested is not None:
            out.append((b"access-control-allow-headers", requested))
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes


def refusal(code: int) -> Reply:
    return Reply(eio.error_status(code), eio.error_body(code), JSON)


OK = Reply(200, b"ok", b"text/html")
TOO_LARGE = Reply(413, b"", b"text/plain")


@dataclass(slots=True)
class Get:
    sock: EngineSocket


@dataclass(slots=True)
class Post:
    sock: EngineSocket


class Polling:
    """The long-polling decisions, for any HTTP server."""

    def __init__(self, engine: Engine, cors: Cors):
        self.engine = engine
        self.cors = cors
        self.max_payload = engine.max_payload

    def route(self, method: str, query_string: bytes, headers: dict[bytes, bytes], secure: bool = False):
        """A Reply to send now, or the session a GET (`Get`) or POST (`Post`) is for."""
        if self.cors.refuses(headers, secure):
            log.info("request from a refused origin")
            return refusal(eio.BAD_REQUEST)
        if method == "OPTIONS":
            return Reply(200, b"OK", b"text/plain")
        if method not in ("GET", "POST"):
            return Reply(405, b"Method Not Found", b"text/plain")
        query = eio.parse_query(query_string)
        code = eio.check_request(query, method, False, self.engine.transport_of)
        if code is not None:
            return refusal(code)
        if query.sid is None:
            sock, packet = self.engine.open(query_string.decode("latin-1"), "polling")
            sock.pending.append(packet)
            sock.pending_bytes += len(packet)
            return Get(sock)
        sock = self.engine.sockets[query.sid]
        if method == "GET":
            if sock.waiter is not None and not sock.waiter.done():
                log.warning("overlapping long-polls from one client, session closed")
                sock.close(eio.TRANSPORT_ERROR)
                return refusal(eio.BAD_REQUEST)
            return Get(sock)
        if sock.posting:
            log.warning("overlapping posts from one client, session closed")
            sock.close(eio.TRANSPORT_ERROR)
            return refusal(eio.BAD_REQUEST)
        if headers.get(b"content-type") == b"application/octet-stream":
            # Binary bodies are engine.io 3; version 4 sends base64 text.
            log.warning("binary polling body from client, session closed")
            sock.close(eio.TRANSPORT_ERROR)
            return refusal(eio.BAD_REQUEST)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_payload:
            return self.too_large()
        return Post(sock)

    @staticmethod
    def ready(sock: EngineSocket) -> bool:
        """A GET for this session is answered now (else it is held)."""
        return bool(sock.pending) or sock.closing

    @staticmethod
    def answer_body(sock: EngineSocket) -> bytes:
        """The body of a 200 answering a GET (what waits for the session)."""
        packets = sock.take_pending()
        if not packets:
            packets = [eio.CLOSE if sock.closing else eio.NOOP]
        return eio.encode_payload(packets)

    def posted(self, sock: EngineSocket, body: bytes) -> Reply:
        try:
            packets = eio.decode_payload(body)
        except eio.EngineIOProtocolError as exc:
            log.warning("malformed request from client, rejected", extra={"error": str(exc), "size": len(body)})
            sock.close(exc.reason)
            packets = ()
        for packet in packets:
            if sock.closing:
                break
            sock.receive(packet)
        return OK

    def too_large(self) -> Reply:
        log.warning("polling body over the size limit, refused", extra={"limit": self.max_payload})
        return TOO_LARGE


async def respond(send, reply: Reply, extra=()) -> None:
    headers = [(b"content-type", reply.content_type), (b"content-length", str(len(reply.body)).encode()), *extra]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class AsgiPolling:
    """Long-polling as an ASGI application."""

    def __init__(self, polling: Polling):
        self.polling = polling

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or ())
        secure = scope.get("scheme") == "https"
        method = scope["method"]
        polling = self.polling
        decision = polling.route(method, scope.get("query_string", b""), headers, secure)
        cors = polling.cors.headers(method, headers, secure)
        if isinstance(decision, Reply):
            if decision.status == 400 and polling.cors.refuses(headers, secure):
                cors = []
            await respond(send, decision, cors)
        elif isinstance(decision, Get):
            await self._get(decision.sock, send, cors)
        else:
            await self._post(decision.sock, receive, send, cors)

    async def _get(self, sock: EngineSocket, send, cors) -> None:
        if not Polling.ready(sock):
            waiter = sock.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if sock.waiter is waiter:
                    sock.waiter = None
        await respond(send, Reply(200, Polling.answer_body(sock), TEXT_PLAIN), cors)

    async def _post(self, sock: EngineSocket, receive, send, cors) -> None:
        body = bytearray()
        sock.posting = True
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away mid-body
                body += message.get("body", b"")
                if len(body) > self.polling.max_payload:
                    await respond(send, self.polling.too_large(), cors)
                    return
                if not message.get("more_body", False):
                    break
        finally:
            sock.posting = False
        await respond(send, self.polling.posted(sock, bytes(body)), cors)
