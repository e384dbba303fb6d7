"""RESP, the Redis wire protocol, as pure code: commands to bytes, bytes to
replies. No I/O here (see redis.py for the connections that use it).

redis-py stays the client for ordinary commands. Two paths carry one Redis
exchange per relayed message and are hot enough that redis-py's per-call
cost (parsing through a StreamReader line by line, retries, health checks,
locks) shows in the profile: the pub/sub subscription and the records
service's recovery log. They read whole chunks from the socket and parse
them here, many replies per call.
"""

from __future__ import annotations


class RespProtocolError(Exception):
    """The bytes are not RESP: the connection is out of step and must go."""


class ReplyError(Exception):
    """An error reply (``-ERR ...`` or a RESP3 bulk error), as a value."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


def pack_command(*args: bytes | str | int) -> bytes:
    """One command as RESP (an array of bulk strings), as Redis reads it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete:
    """Returned, never raised, where a reply is not all there yet: an
    exception instance raised again and again would keep every frame it
    passed through (and their bytes) alive on its traceback."""

    __slots__ = ()


_INCOMPLETE = _Incomplete()
_MAX_LINE = 64 * 1024
_AGGREGATES = frozenset(b"*>~%|")


class _Frame:
    """An aggregate whose elements are still arriving."""

    __slots__ = ("items", "kind", "left")

    def __init__(self, kind: int, count: int):
        self.kind = kind
        self.left = count
        self.items: list = []

    def value(self):
        """Once complete: the list, or for an attribute the marker that
        drops it (it precedes the reply it describes; nobody here asks)."""
        return _ATTRIBUTE if self.kind == 124 else self.items


class ReplyReader:
    """Feed bytes, get complete replies in order.

    Arrays, pushes and sets become lists, maps become lists of alternating
    keys and values, bulk and simple strings stay bytes, integers become
    int, error replies become ReplyError values (never raised), nulls None.
    Attributes (RESP3 ``|``), before a reply or an element of one, are read
    and dropped. A length past `max_bulk` or `max_items`, aggregates nested
    deeper than `max_depth`, or a type byte RESP does not have, raise
    RespProtocolError: the stream cannot be trusted after that.

    Linear in the bytes however they are cut: a reply is first read whole;
    if it is not all there, it is read again element by element, and its
    complete elements are kept (`_stack`), never parsed again. So each
    element is read at most twice, plus once more per feed that cuts it
    (`headers_read` counts element headers read).
    """

    def __init__(self, *, max_bulk: int = 512 * 1024 * 1024, max_items: int = 1 << 20, max_depth: int = 32):
        self._buf = bytearray()
        self._stack: list[_Frame] = []
        self._max_bulk = max_bulk
        self._max_items = max_items
        # Redis nests a handful of levels (XREAD: 4); the bound keeps the
        # whole-reply path's recursion far from Python's limit.
        self._max_depth = max_depth
        self.headers_read = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        replies: list = []
        stack = self._stack
        pos = 0
        while pos < len(buf):
            if not stack:
                # Most replies arrive whole: read them in one go, and
                # only a cut one element by element (once, then resumed).
                value, end = self._whole(buf, pos)
                if value is not _INCOMPLETE:
                    pos = end
                    if value is not _ATTRIBUTE:
                        replies.append(value)
                    continue
            value, end = self._element(buf, pos)
            if value is _INCOMPLETE:
                break
            pos = end
            if type(value) is _Frame:
                if len(stack) >= self._max_depth:
                    raise RespProtocolError(f"RESP aggregates nested deeper than {self._max_depth}")
                stack.append(value)
                continue
            while True:
                if not stack:
                    if value is not _ATTRIBUTE:
                        replies.append(value)
                    break
                if value is _ATTRIBUTE:
                    break  # before an element: not one of the aggregate's
                top = stack[-1]
                top.items.append(value)
                top.left -= 1
                if top.left:
                    break
                stack.pop()
                value = top.value()
        if pos:
            del buf[:pos]
        return replies

    def _line(self, buf: bytearray, pos: int):
        """The line at `pos` and the position after it, or _INCOMPLETE."""
        # Searched no further than the longest line allowed: a longer one is
        # refused whether or not its end has arrived.
        end = buf.find(b"\r\n", pos, pos + _MAX_LINE + 2)
        if end < 0:
            if len(buf) - pos > _MAX_LINE + 1:
                raise RespProtocolError("RESP line longer than 64 KiB")
            return _INCOMPLETE, pos
        return bytes(buf[pos:end]), end + 2

    def _length(self, text: bytes, limit: int) -> int:
        try:
            n = int(text)
        except ValueError:
            raise RespProtocolError(f"bad RESP length {text[:20]!r}") from None
        if n > limit:
            raise RespProtocolError(f"RESP length {n} over the limit {limit}")
        return n

    def _whole(self, buf: bytearray, pos: int, depth: int = 0):
        """The whole reply at `pos` and the position after it, or
        _INCOMPLETE if it is not all there (its frames are dropped)."""
        value, pos = self._element(buf, pos)
        if type(value) is _Frame:
            if depth >= self._max_depth:
                raise RespProtocolError(f"RESP aggregates nested deeper than {self._max_depth}")
            items = value.items
            left = value.left
            while left:
                item, pos = self._whole(buf, pos, depth + 1)
                if item is _INCOMPLETE:
                    return item, pos
                if item is not _ATTRIBUTE:
                    items.append(item)
                    left -= 1
            return value.value(), pos
        return value, pos

    def _element(self, buf: bytearray, pos: int):
        """The value at `pos` and the position after it; for an aggregate
        with elements to come, its _Frame; _INCOMPLETE if it is not all
        there yet."""
        if pos >= len(buf):
            return _INCOMPLETE, pos
        kind = buf[pos]
        line, pos = self._line(buf, pos + 1)
        if line is _INCOMPLETE:
            return line, pos
        self.headers_read += 1
        if kind == 36 or kind == 61:  # $ bulk string, = verbatim string
            n = self._length(line, self._max_bulk)
            if n < 0:
                return None, pos
            end = pos + n
            if len(buf) < end + 2:
                return _INCOMPLETE, pos
            if buf[end : end + 2] != b"\r\n":
                raise RespProtocolError("RESP bulk string not followed by CRLF")
            value = bytes(buf[pos:end])
            return (value[4:] if kind == 61 else value), end + 2
        if kind in _AGGREGATES:
            n = self._length(line, self._max_items)
            if n < 0:
                return None, pos
            count = n * 2 if kind in (37, 124) else n  # % map, | attribute: pairs
            frame = _Frame(kind, count)
            return (frame.value() if not count else frame), pos
        if kind == 43:  # + simple string
            return line, pos
        if kind == 45:  # - error
            return ReplyError(line.decode("utf-8", "replace")), pos
        if kind == 58 or kind == 40:  # : integer, ( big number
            try:
                return int(line), pos
            except ValueError:
                raise RespProtocolError(f"bad RESP integer {line[:20]!r}") from None
        if kind == 95:  # _ null
            return None, pos
        if kind == 35:  # # boolean
            return line == b"t", pos
        if kind == 44:  # , double
            try:
                return float(line), pos
            except ValueError:
                raise RespProtocolError(f"bad RESP double {line[:20]!r}") from None
        if kind == 33:  # ! bulk error (it has no null form)
            n = self._length(line, self._max_bulk)
            if n < 0:
                raise RespProtocolError(f"bad RESP length {line[:20]!r}")
            end = pos + n
            if len(buf) < end + 2:
                return _INCOMPLETE, pos
            return ReplyError(bytes(buf[pos:end]).decode("utf-8", "replace")), end + 2
        raise RespProtocolError(f"unknown RESP type byte {kind!r}")


class _Attribute:
    __slots__ = ()


_ATTRIBUTE = _Attribute()
