"""Engine.IO protocol 4, sans I/O: packets, polling payloads, the OPEN
handshake, request checks with the error codes socket.io clients know, ping
timing and the websocket upgrade probe.

Everything here takes bytes or text and returns values or raises
`EngineIOProtocolError`; sockets, HTTP and timers live in the adapters (polling.py,
websocket.py, sockets.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

# One compact encoder for the packets sent per connect (json.dumps with
# options would build a new one per call).
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode

PROTOCOL = 4

OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = "0", "1", "2", "3", "4", "5", "6"
PACKET_TYPES = frozenset((OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP))
SEPARATOR = "\x1e"  # between packets of a polling payload
PROBE = "probe"

# Close reasons, as engine.io names them (the Socket.IO layer passes them on).
TRANSPORT_CLOSE = "transport close"
TRANSPORT_ERROR = "transport error"
PARSE_ERROR = "parse error"
PING_TIMEOUT = "ping timeout"
SERVER_CLOSE = "forced close"


class EngineIOProtocolError(ValueError):
    """Input that is not Engine.IO. `reason` is engine.io's close reason."""

    reason = PARSE_ERROR


@dataclass(frozen=True, slots=True)
class Packet:
    type: str
    data: str | bytes = ""


def decode_packet(data: str | bytes) -> Packet:
    """One packet: a websocket message, or one part of a polling payload.
    A binary websocket message is a MESSAGE carrying bytes; text starting
    with `b` is a base64 binary MESSAGE (polling)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Packet(MESSAGE, bytes(data))
    if not data:
        raise EngineIOProtocolError("empty packet")
    kind = data[0]
    if kind == "b":
        try:
            return Packet(MESSAGE, base64.b64decode(data[1:], validate=True))
        except (binascii.Error, ValueError):
            raise EngineIOProtocolError("invalid base64 packet") from None
    if kind not in PACKET_TYPES:
        raise EngineIOProtocolError("unknown packet type")
    return Packet(kind, data[1:])


def encode_packet(kind: str, data: str = "") -> str:
    return kind + data


def decode_payload(body: bytes) -> list[Packet]:
    """A polling POST body: UTF-8 packets separated by 0x1e. Any bad part
    rejects the whole body (engine.io closes the session on it)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EngineIOProtocolError("payload not utf-8") from None
    return [decode_packet(part) for part in text.split(SEPARATOR)]


def encode_payload(packets: list[str]) -> bytes:
    """Text packets (type first) as one polling response body."""
    return SEPARATOR.join(packets).encode("utf-8")


def encode_binary_for_polling(data: bytes) -> str:
    return "b" + base64.b64encode(data).decode("ascii")


def open_packet(sid: str, upgrades: list[str], ping_interval_ms: int, ping_timeout_ms: int, max_payload: int) -> str:
    """`0{"sid":...}`, its keys in engine.io's order."""
    body = {
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": ping_interval_ms,
        "pingTimeout": ping_timeout_ms,
        "maxPayload": max_payload,
    }
    return OPEN + _COMPACT(body)


# -- requests ----------------------------------------------------------------

UNKNOWN_TRANSPORT, UNKNOWN_SID, BAD_HANDSHAKE_METHOD, BAD_REQUEST, FORBIDDEN, UNSUPPORTED_PROTOCOL_VERSION = range(6)
ERROR_MESSAGES = {
    UNKNOWN_TRANSPORT: "Transport unknown",
    UNKNOWN_SID: "Session ID unknown",
    BAD_HANDSHAKE_METHOD: "Bad handshake method",
    BAD_REQUEST: "Bad request",
    FORBIDDEN: "Forbidden",
    UNSUPPORTED_PROTOCOL_VERSION: "Unsupported protocol version",
}
TRANSPORTS = ("polling", "websocket")


def error_status(code: int) -> int:
    return 403 if code == FORBIDDEN else 400


def error_body(code: int) -> bytes:
    """The JSON body engine.io answers a refused request with."""
    return json.dumps({"code": code, "message": ERROR_MESSAGES[code]}, separators=(",", ":")).encode()


class Query(NamedTuple):
    transport: str | None
    sid: str | None
    eio: str | None
    b64: bool


_QUERY_SLOTS = {"transport": 0, "sid": 1, "EIO": 2, "b64": 3}


def _form_unquote(text: str) -> str:
    return unquote(text.replace("+", " "), errors="replace")


def _first_values(query_string: str | bytes, slots: dict[str, int]) -> list[str | None]:
    """The first value of each name in `slots` (name -> index), read as
    `urllib.parse.parse_qs` reads them (form escapes, blank values left
    out) in one pass: this runs once per poll and per connect."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    found: list[str | None] = [None] * len(slots)
    for field in query_string.split("&"):
        name, _, value = field.partition("=")
        if "%" in field or "+" in field:
            name, value = _form_unquote(name), _form_unquote(value)
        slot = slots.get(name)
        if slot is not None and value and found[slot] is None:
            found[slot] = value
    return found


def parse_query(query_string: str | bytes) -> Query:
    transport, sid, eio, b64 = _first_values(query_string, _QUERY_SLOTS)
    return Query(transport, sid, eio, b64 is not None)


def query_value(query_string: str | bytes, name: str) -> str | None:
    """One parameter of a query string (the first value, as parse_qs reads it)."""
    return _first_values(query_string, {name: 0})[0]


def check_request(query: Query, method: str, upgrade: bool, session_transport) -> int | None:
    """The engine.io error code refusing this request, or None. Checks in
    engine.io's order. `session_transport(sid)` gives the transport a known
    session is on, or None when the sid is unknown."""
    if query.transport not in TRANSPORTS:
        return UNKNOWN_TRANSPORT
    if query.sid is not None:
        current = session_transport(query.sid)
        if current is None:
            return UNKNOWN_SID
        if not upgrade and current != query.transport:
            return BAD_REQUEST
        if upgrade and query.transport != "websocket":
            return BAD_REQUEST
        return None
    if method != "GET":
        return BAD_HANDSHAKE_METHOD
    if query.transport == "websocket" and not upgrade:
        return BAD_REQUEST
    if query.eio != str(PROTOCOL):
        return UNSUPPORTED_PROTOCOL_VERSION
    return None


# -- timing ------------------------------------------------------------------


class PingClock:
    """When a session is due its next PING and when an unanswered one times
    out (engine.io 4: the server pings, the client answers)."""

    __slots__ = ("awaiting", "due", "interval", "timeout")

    def __init__(self, interval: float, timeout: float, now: float):
        self.interval = interval
        self.timeout = timeout
        self.due = now + interval
        self.awaiting = False

    def tick(self, now: float) -> str | None:
        """PING when one should be sent now, PING_TIMEOUT when the client
        failed to answer in time, else None."""
        if now < self.due:
            return None
        if self.awaiting:
            return PING_TIMEOUT
        self.awaiting = True
        self.due = now + self.timeout
        return PING

    def pong(self, now: float) -> None:
        if self.awaiting:
            self.awaiting = False
            self.due = now + self.interval


class UpgradeProbe:
    """The polling -> websocket upgrade, as the server sees the new
    websocket: `2probe` answered `3probe` (and a NOOP ends the pending poll),
    then `5` completes it. Anything else fails it."""

    WAIT_PROBE, WAIT_UPGRADE, DONE, FAILED = range(4)

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = self.WAIT_PROBE

    def feed(self, packet: Packet) -> str | None:
        """What to do: "probe" (answer 3probe, send a NOOP on polling),
        "upgrade" (switch the session over), "fail" (close this websocket),
        or None (ignore the packet)."""
        if self.state == self.WAIT_PROBE:
            if packet.type == PING and packet.data == PROBE:
                self.state = self.WAIT_UPGRADE
                return "probe"
        elif self.state == self.WAIT_UPGRADE:
            if packet.type == UPGRADE:
                self.state = self.DONE
                return "upgrade"
            if packet.type == NOOP:
                return None
        else:
            return None
        self.state = self.FAILED
        return "fail"
