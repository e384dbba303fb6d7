"""RFC 6455 server frames, sans I/O.

A server frame is never masked (section 5.1) and the records service turns
per-message compression off, so one broadcast has the same wire bytes for
every websocket recipient: it is framed once and that buffer is written to
each socket's transport as is.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
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
