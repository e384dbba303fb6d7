"""Engine.IO HTTP long-polling on ASGI, and the CORS rules of the records
port (one allowed origin, with credentials).

A GET with no sid opens a session; a GET with one is answered at once with
what waits for the session, or held until something does (a PING comes
every ping interval). A POST carries client packets; its body is read as
the server delivers it, so a `Transfer-Encoding: chunked` body counts the
same as one with a Content-Length. Refusals carry engine.io's error codes.
"""

from __future__ import annotations

import asyncio
import logging

from . import engineio as eio
from .sockets import Engine

log = logging.getLogger("channels.records.polling")

TEXT_PLAIN = b"text/plain; charset=UTF-8"


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


class Cors:
    """`origin`: the one browser origin allowed. None: only the request's
    own origin (its Host, or what a proxy says it forwarded)."""

    def __init__(self, origin: str | None, credentials: bool = True):
        self.origin = origin
        self.credentials = credentials

    def _allowed(self, scope) -> list[str]:
        if self.origin is not None:
            return [self.origin]
        host = header(scope, b"host")
        if host is None:
            return []
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        allowed = [f"{scheme}://{host}"]
        proto, fwd_host = header(scope, b"x-forwarded-proto"), header(scope, b"x-forwarded-host")
        if proto is not None or fwd_host is not None:
            proto = (proto or scheme).split(",")[0].strip()
            fwd_host = (fwd_host or host).split(",")[0].strip()
            allowed.append(f"{proto}://{fwd_host}")
        return allowed

    def refuses(self, scope) -> bool:
        """An Origin header that is not allowed (no header: not a browser)."""
        origin = header(scope, b"origin")
        return bool(origin) and origin not in self._allowed(scope)

    def headers(self, scope) -> list[tuple[bytes, bytes]]:
        out = []
        origin = header(scope, b"origin")
        if origin is not None and origin in self._allowed(scope):
            out.append((b"access-control-allow-origin", origin.encode("latin-1")))
        if scope.get("method") == "OPTIONS":
            out.append((b"access-control-allow-methods", b"OPTIONS, GET, POST"))
        requested = header(scope, b"access-control-request-headers")
        if requested is not None:
            out.append((b"access-control-allow-headers", requested.encode("latin-1")))
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out


async def respond(send, status: int, body: bytes, content_type: bytes, extra=()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Polling:
    def __init__(self, engine: Engine, cors: Cors):
        self.engine = engine
        self.cors = cors
        self.max_payload = engine.max_payload

    async def __call__(self, scope, receive, send) -> None:
        method = scope["method"]
        if self.cors.refuses(scope):
            log.info("request from a refused origin")
            await respond(send, 400, eio.error_body(eio.BAD_REQUEST), b"application/json")
            return
        cors = self.cors.headers(scope)
        if method == "OPTIONS":
            await respond(send, 200, b"OK", b"text/plain", cors)
            return
        if method not in ("GET", "POST"):
            await respond(send, 405, b"Method Not Found", b"text/plain", cors)
            return
        query = eio.parse_query(scope.get("query_string", b""))
        code = eio.check_request(query, method, False, self.engine.transport_of)
        if code is not None:
            await respond(send, eio.error_status(code), eio.error_body(code), b"application/json", cors)
            return
        if query.sid is None:
            sock, packet = self.engine.open(scope.get("query_string", b"").decode("latin-1"), "polling")
            sock.pending.append(packet)
            sock.pending_bytes += len(packet)
            await self._get(sock, send, cors)
        elif method == "GET":
            await self._get(self.engine.sockets[query.sid], send, cors)
        else:
            await self._post(self.engine.sockets[query.sid], scope, receive, send, cors)

    async def _get(self, sock, send, cors) -> None:
        if sock.waiter is not None and not sock.waiter.done():
            log.warning("overlapping long-polls from one client, session closed")
            sock.close(eio.TRANSPORT_ERROR)
            await respond(send, 400, eio.error_body(eio.BAD_REQUEST), b"application/json", cors)
            return
        if not sock.pending and not sock.closing:
            waiter = sock.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if sock.waiter is waiter:
                    sock.waiter = None
        packets = sock.take_pending()
        if not packets:
            packets = [eio.CLOSE if sock.closing else eio.NOOP]
        await respond(send, 200, eio.encode_payload(packets), TEXT_PLAIN, cors)

    async def _post(self, sock, scope, receive, send, cors) -> None:
        if sock.posting:
            log.warning("overlapping posts from one client, session closed")
            sock.close(eio.TRANSPORT_ERROR)
            await respond(send, 400, eio.error_body(eio.BAD_REQUEST), b"application/json", cors)
            return
        if header(scope, b"content-type") == "application/octet-stream":
            # Binary bodies are engine.io 3; version 4 sends base64 text.
            log.warning("binary polling body from client, session closed")
            sock.close(eio.TRANSPORT_ERROR)
            await respond(send, 400, eio.error_body(eio.BAD_REQUEST), b"application/json", cors)
            return
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_payload:
            await self._too_large(send, cors)
            return
        body = bytearray()
        sock.posting = True
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away mid-body
                body += message.get("body", b"")
                if len(body) > self.max_payload:
                    await self._too_large(send, cors)
                    return
                if not message.get("more_body", False):
                    break
        finally:
            sock.posting = False
        try:
            packets = eio.decode_payload(bytes(body))
        except eio.ParseError as exc:
            log.warning("malformed request from client, rejected", extra={"error": str(exc), "size": len(body)})
            sock.close(exc.reason)
            packets = ()
        for packet in packets:
            if sock.closing:
                break
            sock.receive(packet)
        await respond(send, 200, b"ok", b"text/html", cors)

    async def _too_large(self, send, cors) -> None:
        log.warning("polling body over the size limit, refused", extra={"limit": self.max_payload})
        await respond(send, 413, b"", b"text/plain", cors)
