"""The server side of the RFC 6455 opening handshake, sans I/O: the
client's upgrade request in, an ASGI-ready request or an HTTP refusal out,
and the 101 response bytes."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_REQUEST_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Upgrade:
    target: bytes  # path and query, as sent
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    key: bytes
    subprotocols: list[str]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def parse_upgrade(head: bytes) -> Upgrade | Refusal:
    """`head`: the request line and headers, without the blank line."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1.1"):
        return Refusal(400, "not a GET HTTP/1.1 request")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return Refusal(400, "malformed header")
        headers.append((name.lower(), value.strip()))
    checked = check_upgrade(headers)
    if isinstance(checked, Refusal):
        return checked
    key, subprotocols = checked
    return Upgrade(target=parts[1], headers=headers, key=key, subprotocols=subprotocols)


def check_upgrade(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, list[str]] | Refusal:
    """The key and offered subprotocols of a GET HTTP/1.1 request's headers
    (names lower-cased, values stripped), or why it is no websocket upgrade."""
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        fields[name] = fields[name] + b", " + value if name in fields else value
    if b"websocket" not in _tokens(fields.get(b"upgrade", b"")):
        return Refusal(400, "no websocket upgrade")
    if b"upgrade" not in _tokens(fields.get(b"connection", b"")):
        return Refusal(400, "no connection upgrade")
    if fields.get(b"sec-websocket-version") != b"13":
        return Refusal(426, "unsupported websocket version", ((b"Sec-WebSocket-Version", b"13"),))
    key = fields.get(b"sec-websocket-key", b"")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return Refusal(400, "bad Sec-WebSocket-Key")
    protocols = fields.get(b"sec-websocket-protocol", b"")
    return key, [p.strip().decode("latin-1") for p in protocols.split(b",") if p.strip()]


def accept_value(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def accept_response(key: bytes, headers=(), subprotocol: str | None = None) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_value(key),
    ]
    if subprotocol:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1"))
    for name, value in headers:
        if b"\r" in name + value or b"\n" in name + value:
            continue  # never let a header value split the response
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


_PHRASES = {
    400: b"Bad Request", 403: b"Forbidden", 426: b"Upgrade Required", 429: b"Too Many Requests",
    500: b"Internal Server Error", 503: b"Service Unavailable",
}


def response_head(status: int, headers=()) -> bytes:
    """A final HTTP response's status line and headers, up to and with the
    blank line, closing the connection after it. The body is whatever
    follows until the close; a header that would split the head is dropped."""
    lines = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Error"))]
    for name, value in headers:
        if b"\r" in name + value or b"\n" in name + value or name.lower() == b"connection":
            continue
        lines.append(name + b": " + value)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def refusal_response(status: int, reason: str, extra_headers=()) -> bytes:
    body = reason.encode("utf-8")
    headers = [*extra_headers, (b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"%d" % len(body))]
    return response_head(status, headers) + body
