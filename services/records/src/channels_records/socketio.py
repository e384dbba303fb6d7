"""Socket.IO protocol 5, sans I/O: strict parsing of what clients send and
the packets the server answers with on the default namespace.

The text after the Engine.IO MESSAGE type is
`<type>[<attachments>-][/<nsp>,][<ack id>][<json>]`. Parsing follows the
reference parser's rules and raises `SocketIOProtocolError` with its messages (an
empty packet, as there, is a CONNECT). Binary attachments are never accepted: Loomio's clients
send none, and accepting them means buffering client bytes for nothing.
Broadcast EVENTs and CONNECT replies are built in protocol.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from channels_common import jsonin

CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)
DEFAULT_NAMESPACE = "/"
RESERVED_EVENTS = frozenset(
    ("connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener")
)
MAX_ACK_ID_DIGITS = 16


class SocketIOProtocolError(ValueError):
    """Not a Socket.IO packet; the message is the reference parser's."""


@dataclass(frozen=True, slots=True)
class Packet:
    type: int
    namespace: str = DEFAULT_NAMESPACE
    id: int | None = None
    data: object = None


def _valid_payload(kind: int, payload) -> bool:
    if kind == CONNECT:
        return payload is None or isinstance(payload, dict)
    if kind == DISCONNECT:
        return payload is None
    if kind == CONNECT_ERROR:
        return isinstance(payload, (str, dict))
    if kind in (EVENT, BINARY_EVENT):
        if not isinstance(payload, list) or not payload:
            return False
        name = payload[0]
        if isinstance(name, bool):
            return False
        return isinstance(name, (int, float)) or (isinstance(name, str) and name not in RESERVED_EVENTS)
    return isinstance(payload, list)  # ACK


def decode(data: str | bytes) -> Packet:
    if not isinstance(data, str):
        raise SocketIOProtocolError("got binary data when not reconstructing a packet")
    if not data:
        return Packet(CONNECT)  # as the reference parser reads it
    first = data[0]
    if not ("0" <= first <= "6"):
        raise SocketIOProtocolError(f"unknown packet type {first if first.isdigit() and first.isascii() else 'NaN'}")
    kind = int(first)
    i = 1
    if kind in (BINARY_EVENT, BINARY_ACK):
        dash = data.find("-", 1)
        if dash < 0 or not data[1:dash].isdigit():
            raise SocketIOProtocolError("Illegal attachments")
        raise SocketIOProtocolError("binary packets are not accepted")
    namespace = DEFAULT_NAMESPACE
    if data.startswith("/", i):
        comma = data.find(",", i)
        end = len(data) if comma < 0 else comma
        namespace = data[i:end]
        i = end + 1 if comma >= 0 else end
    ack_id = None
    j = i
    while j < len(data) and "0" <= data[j] <= "9":
        j += 1
    if j > i:
        if j - i > MAX_ACK_ID_DIGITS:
            raise SocketIOProtocolError("invalid ack id")
        ack_id = int(data[i:j])
        i = j
    payload = None
    if i < len(data):
        try:
            payload = jsonin.loads(data[i:], max_bytes=len(data))
        except jsonin.JSONInputError:
            raise SocketIOProtocolError("invalid payload") from None
        if payload is None:
            raise SocketIOProtocolError("invalid payload")  # `null` is no payload at all
    if not _valid_payload(kind, payload):
        raise SocketIOProtocolError("invalid payload")
    return Packet(kind, namespace, ack_id, payload)


def _prefix(kind: int, namespace: str) -> str:
    return str(kind) if namespace == DEFAULT_NAMESPACE else f"{kind}{namespace},"


def encode_connect_error(message: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return _prefix(CONNECT_ERROR, namespace) + json.dumps({"message": message}, separators=(",", ":"))


def encode_disconnect(namespace: str = DEFAULT_NAMESPACE) -> str:
    return _prefix(DISCONNECT, namespace)
