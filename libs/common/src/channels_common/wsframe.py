"""RFC 6455 server frames, sans I/O.

A server frame is never masked (section 5.1) and the services turn
per-message compression off, so one broadcast has the same wire bytes for
every websocket recipient: it is framed once and that buffer is written to
each socket's transport as is.
"""

from __future__ import annotations

import struct

from .closecodes import APPLICATION_RANGE, INVALID_DATA, MESSAGE_TOO_BIG, NO_STATUS, PROTOCOL_ERROR, SENDABLE

OP_TEXT = 0x1
OP_BINARY = 0x2
FIN = 0x80


def frame_header(opcode: int, length: int) -> bytes:
    """The header of one final, unmasked frame carrying `length` bytes."""
    first = FIN | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    if length < 1 << 63:
        return struct.pack("!BBQ", first, 127, length)
    raise ValueError("frame too large")


def text_frame(payload: bytes) -> bytes:
    """One complete text frame (the payload must be UTF-8 already)."""
    return frame_header(OP_TEXT, len(payload)) + payload


def binary_frame(payload: bytes) -> bytes:
    return frame_header(OP_BINARY, len(payload)) + payload


# -- client frames -----------------------------------------------------------

OP_CONTINUATION = 0x0
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)



class Message:
    """One complete data message: text (str) or binary (bytes)."""

    __slots__ = ("data",)

    def __init__(self, data: str | bytes):
        self.data = data

    def __eq__(self, other):
        return type(other) is Message and other.data == self.data

    def __repr__(self):
        return f"Message({len(self.data)} {'chars' if isinstance(self.data, str) else 'bytes'})"


class Ping:
    __slots__ = ("payload",)

    def __init__(self, payload: bytes):
        self.payload = payload

    def __eq__(self, other):
        return type(other) is Ping and other.payload == self.payload


class Close:
    """The peer's close frame; `code` 1005 when it carried none."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str = ""):
        self.code, self.reason = code, reason

    def __eq__(self, other):
        return type(other) is Close and (other.code, other.reason) == (self.code, self.reason)

    def __repr__(self):
        return f"Close({self.code}, {self.reason!r})"


class WebSocketProtocolError(Exception):
    """The peer broke the protocol: close with `code`, read nothing more."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


def close_frame(code: int, reason: str = "") -> bytes:
    # A control frame carries 125 bytes at most; cut on a character boundary.
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    payload = b"" if code == NO_STATUS else struct.pack("!H", code) + text
    return frame_header(OP_CLOSE, len(payload)) + payload


def pong_frame(payload: bytes) -> bytes:
    return frame_header(OP_PONG, len(payload)) + payload


class FrameParser:
    """Bytes from a client in, events out (Message, Ping, Close; pongs are
    swallowed). Raises WebSocketProtocolError on anything RFC 6455 forbids of a
    client, on a message over `max_size` bytes, and on invalid UTF-8 text;
    after that, or after a Close, it must not be fed again.

    Work is linear in the bytes received however they are segmented: an
    unfinished frame is parsed again only once it holds the bytes its next
    step needs (the rest of the header, or the whole frame), and one that
    outlasts a second read waits in a bytearray that grows by doubling up to
    its declared size. Each byte is copied at most about four times.
    `bytes_copied` counts every byte the parser copies (buffering and
    payload extraction; unmasking aside, which is the same for every
    segmentation), so tests can check that without timing anything."""

    __slots__ = (
        "_fragments",
        "_fragments_size",
        "_message_opcode",
        "_need",
        "_pending",
        "_pending_len",
        "bytes_copied",
        "max_size",
    )

    def __init__(self, max_size: int):
        self.max_size = max_size
        # An unfinished frame: _pending[:_pending_len], parsed again once it
        # holds _need bytes. The tail of one read stays the bytes it came in
        # (most split frames complete with the next read); past that it is a
        # bytearray, not a list of reads, so a client trickling single bytes
        # costs about one byte of memory per byte.
        self._pending: bytes | bytearray | None = None
        self._pending_len = 0
        self._need = 0
        self._fragments: bytearray | None = None
        self._fragments_size = 0
        self._message_opcode = 0
        self.bytes_copied = 0

    def feed(self, data: bytes) -> list:
        """`data` must be bytes: a tail of it may be kept as it is."""
        more = None
        if self._pending_len:
            buffer = self._pending
            held = self._pending_len
            need = self._need
            end = held + len(data)
            if type(buffer) is bytes and end >= need:
                # The tail of one read, as it came: joining it once is cheap,
                # and completes most split frames without a bytearray.
                buffer = buffer + data
                self.bytes_copied += end
                owned = False
            else:
                if end > need:
                    # Complete the held bytes only; the rest is parsed as a read
                    # of its own, so the held buffer never grows past `need`.
                    more = data[need - held:]
                    self.bytes_copied += len(more)
                    data = memoryview(data)[:need - held]
                    end = need
                if end > len(buffer) or type(buffer) is bytes:
                    # Doubling keeps the copies of a trickled frame linear; the
                    # cap at `need` keeps memory within twice what arrived.
                    grown = bytearray(min(need, 2 * end))
                    grown[:held] = memoryview(buffer)[:held]
                    self.bytes_copied += held
                    self._pending = buffer = grown
                buffer[held:end] = data
                self.bytes_copied += end - held
                if end < need:
                    self._pending_len = end
                    return []
                owned = True
            self._pending, self._pending_len = None, 0
        else:
            buffer = data
            end = len(data)
            owned = False
        events = []
        pos = 0
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            fin = first & 0x80
            opcode = first & 0x0F
            if first & 0x70:
                raise WebSocketProtocolError(PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise WebSocketProtocolError(PROTOCOL_ERROR, "unmasked client frame")
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    need = 4
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if end - pos < 10:
                    need = 10
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                if length >> 63:
                    raise WebSocketProtocolError(PROTOCOL_ERROR, "bad frame length")
                header = 10
            if opcode in _CONTROL_OPCODES:
                if not fin or length > 125:
                    raise WebSocketProtocolError(PROTOCOL_ERROR, "bad control frame")
            elif opcode not in _DATA_OPCODES:
                raise WebSocketProtocolError(PROTOCOL_ERROR, "unknown opcode")
            elif length + self._fragments_size > self.max_size:
                # Refused from the header alone: the payload is never buffered.
                raise WebSocketProtocolError(MESSAGE_TOO_BIG, "message too big")
            start = pos + header + 4
            if end - start < length:
                need = start + length - pos
                break
            payload = unmask(buffer[start:start + length], buffer[start - 4:start])
            self.bytes_copied += length
            pos = start + length
            if opcode in _CONTROL_OPCODES:
                if opcode == OP_CLOSE:
                    events.append(self._close(payload))
                    return events
                if opcode == OP_PING:
                    events.append(Ping(payload))
                continue
            message = self._data(opcode, fin, payload)
            if message is not None:
                events.append(message)
        if pos < end:
            # Hold the start of the next frame until the bytes its next step
            # needs (`need`: the rest of its header, or all of it) are here.
            if end - pos < 2:
                need = 2
            if owned and pos == 0:
                kept = buffer  # already ours, and nothing consumed from it
            else:
                # A read's bytes are kept as they are (the same object when pos
                # is 0); the tail of a bytearray is copied.
                kept = buffer[pos:end]
                if kept is not buffer:
                    self.bytes_copied += end - pos
            self._pending, self._pending_len, self._need = kept, end - pos, need
        if more is not None:
            events += self.feed(more)
        return events

    def _data(self, opcode: int, fin: int, payload: bytes | bytearray) -> Message | None:
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise WebSocketProtocolError(PROTOCOL_ERROR, "continuation without a message")
            self._fragments += payload
            self._fragments_size += len(payload)
            self.bytes_copied += len(payload)
            if not fin:
                return None
            payload = self._fragments
            opcode = self._message_opcode
            self._fragments, self._fragments_size = None, 0
            if opcode == OP_BINARY:
                self.bytes_copied += len(payload)
                return Message(bytes(payload))
        elif self._fragments is not None:
            raise WebSocketProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
        elif not fin:
            # One buffer, not a list of fragments: a message of many tiny
            # (or empty) fragments holds its bytes, not an object per frame.
            self._fragments, self._fragments_size, self._message_opcode = bytearray(payload), len(payload), opcode
            self.bytes_copied += len(payload)
            return None
        if opcode == OP_BINARY:
            return Message(payload)
        try:
            return Message(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise WebSocketProtocolError(INVALID_DATA, "invalid UTF-8 text") from None

    @staticmethod
    def _close(payload: bytes) -> Close:
        if not payload:
            return Close(NO_STATUS)
        if len(payload) == 1:
            raise WebSocketProtocolError(PROTOCOL_ERROR, "bad close frame")
        code = int.from_bytes(payload[:2], "big")
        if code not in SENDABLE and code not in APPLICATION_RANGE:
            raise WebSocketProtocolError(PROTOCOL_ERROR, "bad close code")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketProtocolError(INVALID_DATA, "invalid UTF-8 in close reason") from None
        return Close(code, reason)
