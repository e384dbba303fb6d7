"""The Hocuspocus wire protocol, sans I/O: bytes in, typed messages out, and
the encoders for every frame the server writes.

Every frame is `varString(address) varUint(type) payload` in lib0 encoding
(varUint = unsigned LEB128, varString = varUint byte length + UTF-8). The
address is the document name, or `name\\0sessionId` for v4 providers that
enable session awareness. v4 providers also answer a connection-level Ping,
a frame of the single byte 9, with the single byte 10.

Decoding is strict about structure (a truncated or undecodable frame raises
`HocuspocusProtocolError`) and lenient about trailing bytes, as the Hocuspocus server
is: newer providers append fields (v4 appends its version to Auth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

from channels_common import jsonin


class MessageType(IntEnum):
    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3
    SYNC_REPLY = 4
    STATELESS = 5
    BROADCAST_STATELESS = 6
    CLOSE = 7
    SYNC_STATUS = 8
    PING = 9
    PONG = 10


class AuthType(IntEnum):
    TOKEN = 0
    PERMISSION_DENIED = 1
    AUTHENTICATED = 2


class SyncStep(IntEnum):
    STEP1 = 0
    STEP2 = 1
    UPDATE = 2


SCOPE_READ_WRITE = "read-write"
SCOPE_READ_ONLY = "readonly"

# Connection-level frames of v4 providers: the type byte alone, no address.
PING_FRAME = bytes([MessageType.PING])
PONG_FRAME = bytes([MessageType.PONG])

# An empty Yjs update (no structs, no deletions): what a provider sends as
# SyncStep2 when it has nothing the server lacks.
EMPTY_UPDATE = b"\x00\x00"

SESSION_SEPARATOR = "\0"

# lib0 numbers are JavaScript safe integers; anything longer is hostile.
_MAX_VARUINT_BYTES = 8


class HocuspocusProtocolError(ValueError):
    """The frame cannot be decoded. The caller closes the socket."""


# ---------------------------------------------------------------- lib0 codec


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def var_uint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if value < 0:
        raise ValueError("varUint must not be negative")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


def var_string(text: str) -> bytes:
    return var_bytes(text.encode("utf-8"))


class Reader:
    """A cursor over one frame. Every read checks bounds."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def var_uint(self) -> int:
        data, pos = self.data, self.pos
        value = 0
        shift = 0
        for i in range(_MAX_VARUINT_BYTES):
            if pos + i >= len(data):
                raise HocuspocusProtocolError("truncated varUint")
            byte = data[pos + i]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos + i + 1
                return value
            shift += 7
        raise HocuspocusProtocolError("varUint too long")

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        end = self.pos + length
        if end > len(self.data):
            raise HocuspocusProtocolError("truncated byte array")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def var_string(self) -> str:
        raw = self.var_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HocuspocusProtocolError("string is not UTF-8") from exc


# ------------------------------------------------------------ client frames


@dataclass(frozen=True, slots=True)
class ConnectionPing:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionPong:
    pass


@dataclass(frozen=True, slots=True)
class Sync:
    address: str
    step: SyncStep
    payload: bytes  # a state vector for STEP1, an update otherwise
    reply: bool = False  # sent as SyncReply: never answer with our SyncStep1


@dataclass(frozen=True, slots=True)
class Awareness:
    address: str
    update: bytes


@dataclass(frozen=True, slots=True)
class Token:
    address: str
    token: str = field(repr=False)  # a secret: never in a repr, so never in a log
    provider_version: str | None = None  # v4 providers append it


@dataclass(frozen=True, slots=True)
class AuthReply:
    """Authenticated / PermissionDenied / token request: server to client only."""

    address: str
    kind: AuthType
    text: str | None


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    address: str


@dataclass(frozen=True, slots=True)
class Stateless:
    address: str
    payload: str


@dataclass(frozen=True, slots=True)
class BroadcastStateless:
    address: str
    payload: str


@dataclass(frozen=True, slots=True)
class Close:
    address: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SyncStatus:
    address: str
    applied: bool


@dataclass(frozen=True, slots=True)
class DocumentPing:
    """Type 9/10 addressed to a document: no provider sends these; accepted as
    traffic and otherwise ignored."""

    address: str
    pong: bool


@dataclass(frozen=True, slots=True)
class Unknown:
    address: str
    type: int


Message = (
    ConnectionPing | ConnectionPong | Sync | Awareness | Token | AuthReply | QueryAwareness
    | Stateless | BroadcastStateless | Close | SyncStatus | DocumentPing | Unknown
)


def split_address(address: str) -> tuple[str, str | None]:
    """`name\\0session` -> (name, session); a plain name -> (name, None)."""
    name, sep, session = address.partition(SESSION_SEPARATOR)
    return (name, session) if sep else (name, None)


# SyncStep by value without the enum's call (a third of a decode's cost).
_STEPS = (SyncStep.STEP1, SyncStep.STEP2, SyncStep.UPDATE)


def _decode_short_sync(frame: bytes) -> Sync | None:
    """The bulk of all traffic, a Sync with an address under 128 bytes and a
    payload under 16 KiB, read without a Reader; None for anything else,
    which `decode` reads in full (and refuses the same way)."""
    size = len(frame)
    n = frame[0]
    at = n + 4
    if n >= 0x80 or size < at:
        return None
    kind = frame[n + 1]
    step = frame[n + 2]
    if (kind != MessageType.SYNC and kind != MessageType.SYNC_REPLY) or step > SyncStep.UPDATE:
        return None
    length = frame[n + 3]
    if length >= 0x80:
        if size <= at or frame[at] >= 0x80:
            return None
        length = (length & 0x7F) | (frame[at] << 7)
        at += 1
    end = at + length
    if end > size:
        return None
    try:
        address = frame[1:n + 1].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Sync(address, _STEPS[step], frame[at:end], kind == MessageType.SYNC_REPLY)


def decode(frame: bytes) -> Message:
    """Decode one WebSocket frame, in either direction."""
    if len(frame) == 1:
        if frame[0] == MessageType.PING:
            return ConnectionPing()
        if frame[0] == MessageType.PONG:
            return ConnectionPong()
    elif frame:
        sync = _decode_short_sync(frame)
        if sync is not None:
            return sync
    return _decode_with_reader(frame)


def _decode_with_reader(frame: bytes) -> Message:
    r = Reader(frame)
    address = r.var_string()
    kind = r.var_uint()
    if kind in (MessageType.SYNC, MessageType.SYNC_REPLY):
        step = r.var_uint()
        if step > SyncStep.UPDATE:
            raise HocuspocusProtocolError(f"unknown sync step {step}")
        return Sync(address, _STEPS[step], r.var_bytes(), kind == MessageType.SYNC_REPLY)
    if kind == MessageType.AWARENESS:
        return Awareness(address, r.var_bytes())
    if kind == MessageType.AUTH:
        sub = r.var_uint()
        if sub == AuthType.TOKEN:
            if r.remaining == 0:  # the server's token request carries nothing
                return AuthReply(address, AuthType.TOKEN, None)
            token = r.var_string()
            version = r.var_string() if r.remaining else None
            return Token(address, token, version)
        if sub in (AuthType.PERMISSION_DENIED, AuthType.AUTHENTICATED):
            return AuthReply(address, AuthType(sub), r.var_string())
        raise HocuspocusProtocolError(f"unknown auth message type {sub}")
    if kind == MessageType.QUERY_AWARENESS:
        return QueryAwareness(address)
    if kind == MessageType.STATELESS:
        return Stateless(address, r.var_string())
    if kind == MessageType.BROADCAST_STATELESS:
        return BroadcastStateless(address, r.var_string())
    if kind == MessageType.CLOSE:
        return Close(address, r.var_string() if r.remaining else None)
    if kind == MessageType.SYNC_STATUS:
        return SyncStatus(address, r.var_uint() == 1)
    if kind in (MessageType.PING, MessageType.PONG):
        return DocumentPing(address, kind == MessageType.PONG)
    return Unknown(address, kind)


# ------------------------------------------------------------ server frames


# Server frames start with the address and type: encoded once per address
# (an update is sent to many peers of few documents). A bound on entries
# only: a client churning addresses costs re-encoding, not memory.
@lru_cache(maxsize=4096)
def header(address: str, kind: MessageType) -> bytes:
    return var_string(address) + var_uint(kind)


def encode_sync_step1(address: str, state_vector: bytes) -> bytes:
    return header(address, MessageType.SYNC) + b"\x00" + var_bytes(state_vector)


def encode_sync_step2(address: str, update: bytes) -> bytes:
    return header(address, MessageType.SYNC) + b"\x01" + var_bytes(update)


def encode_update(address: str, update: bytes) -> bytes:
    return header(address, MessageType.SYNC) + b"\x02" + var_bytes(update)


@lru_cache(maxsize=4096)
def encode_sync_status(address: str, applied: bool) -> bytes:
    return header(address, MessageType.SYNC_STATUS) + (b"\x01" if applied else b"\x00")


def encode_awareness(address: str, update: bytes) -> bytes:
    return header(address, MessageType.AWARENESS) + var_bytes(update)


def encode_query_awareness(address: str) -> bytes:
    return header(address, MessageType.QUERY_AWARENESS)


def encode_authenticated(address: str, scope: str) -> bytes:
    return header(address, MessageType.AUTH) + var_uint(AuthType.AUTHENTICATED) + var_string(scope)


def encode_permission_denied(address: str, reason: str) -> bytes:
    return header(address, MessageType.AUTH) + var_uint(AuthType.PERMISSION_DENIED) + var_string(reason)


def encode_token_request(address: str) -> bytes:
    return header(address, MessageType.AUTH) + var_uint(AuthType.TOKEN)


def encode_stateless(address: str, payload: str) -> bytes:
    return header(address, MessageType.STATELESS) + var_string(payload)


def encode_close(address: str, reason: str) -> bytes:
    return header(address, MessageType.CLOSE) + var_string(reason)


# Client frames, for tests and tools that speak as a provider.


def encode_token(address: str, token: str, provider_version: str | None = None) -> bytes:
    out = header(address, MessageType.AUTH) + var_uint(AuthType.TOKEN) + var_string(token)
    return out + var_string(provider_version) if provider_version is not None else out


def encode_sync(address: str, step: SyncStep, payload: bytes, reply: bool = False) -> bytes:
    kind = MessageType.SYNC_REPLY if reply else MessageType.SYNC
    return header(address, kind) + var_uint(step) + var_bytes(payload)


# ------------------------------------------------------- y-protocols payloads


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector: varUint count, then (client, clock) pairs."""
    r = Reader(data)
    count = r.var_uint()
    if count > len(data):
        raise HocuspocusProtocolError("state vector count exceeds its size")
    return {r.var_uint(): r.var_uint() for _ in range(count)}


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client_id: int
    clock: int
    state: object  # the decoded JSON state; None means the client left


def decode_awareness_update(data: bytes) -> list[AwarenessEntry]:
    """Validate an awareness update fully (structure and JSON) before it
    reaches the awareness store, which trusts its input."""
    r = Reader(data)
    count = r.var_uint()
    if count > len(data):
        raise HocuspocusProtocolError("awareness count exceeds its size")
    entries = []
    for _ in range(count):
        client_id = r.var_uint()
        clock = r.var_uint()
        raw = r.var_string()
        try:
            state = jsonin.loads(raw, max_bytes=len(data)) if raw else None
        except jsonin.JSONInputError as exc:
            raise HocuspocusProtocolError(f"awareness state is not JSON ({exc.reason})") from None
        entries.append(AwarenessEntry(client_id, clock, state))
    return entries
