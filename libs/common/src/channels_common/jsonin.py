"""The one parse of JSON that came from outside (Redis payloads, Rails'
records and answers, awareness states): bounded before it is parsed, one
error type whatever is wrong.

Size is checked first, then nesting depth by a linear pre-scan (strings
taken out, brackets counted), so the parser never recurses deep enough to
raise RecursionError and never starts on a payload it would refuse. The
standard's JSON only: Python's NaN and Infinity are refused (a browser's
JSON.parse would refuse them too).
"""

from __future__ import annotations

import json
from array import array
from itertools import accumulate

# Nesting deeper than this is refused. What we read nests a few levels
# (records payloads, awareness states, user records); Python's parser gives
# up near 1000.
MAX_DEPTH = 64

TOO_LARGE = "too_large"
NOT_UTF8 = "not_utf8"
TOO_DEEP = "too_deep"
NOT_JSON = "not_json"


class JSONInputError(ValueError):
    """Outside JSON refused; `reason` is one of the four above, a fixed set
    fit for a metric label. The message never quotes the input."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


# One decoder for every call: json.loads with an option builds a new decoder
# per call, which showed in records' relay profile.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

# Keeps quotes and brackets, deletes the rest; brackets of both kinds as
# "[" and "]"; then each as a step of +1 or -1 (0xff as a signed byte).
_DROP = bytes(b for b in range(256) if b not in b'[]{}"')
_SQUARE = bytes.maketrans(b"{}", b"[]")
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
# Brackets left outside strings up to which innermost pairs are taken out
# pass by pass (a few passes, each in C), before the exact count.
_SHORT = 1024


def nesting_refusal(data: bytes, limit: int) -> str | None:
    """TOO_DEEP if the brackets of `data` (UTF-8 JSON text) nest deeper
    than `limit` outside strings, NOT_JSON if they do not balance, else
    None. Linear, and every pass is in C; never the parser."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return None
    if b"\\" in data:
        # Escapes off first (escaped backslashes, then escaped quotes): every
        # quote left opens or closes a string.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = data.translate(_SQUARE, _DROP)
    if b'"' in marks:
        # Two quotes side by side close one string and open the next, or
        # hold a string with no bracket in it (the usual kind): either way
        # taking them out leaves every bracket inside or outside as it was.
        marks = marks.replace(b'""', b"")
        if b'"' in marks:
            marks = b"".join(marks.split(b'"')[::2])  # what lies outside strings
    if len(marks) <= _SHORT:
        # Balanced and shallow, the usual answer: innermost pairs out, pass
        # by pass. Anything else is counted exactly below.
        rest = marks
        for _ in range(limit):
            shorter = rest.replace(b"[]", b"")
            if not shorter:
                return None
            if len(shorter) == len(rest):
                break
            rest = shorter
    steps = array("b", marks.translate(_STEPS))
    if max(accumulate(steps), default=0) > limit:
        return TOO_DEEP
    if sum(steps) != 0 or min(accumulate(steps), default=0) < 0:
        return NOT_JSON
    return None


def loads_with_text(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> tuple[str, object]:
    """The text of `data` and the value it holds, or JSONInputError."""
    if len(data) > max_bytes:
        raise JSONInputError(TOO_LARGE, f"{len(data)} bytes")
    if isinstance(data, str):
        text = data
        # The scan reads bytes; a text with few brackets needs none.
        few = data.count("[") + data.count("{") <= max_depth
        refusal = None if few else nesting_refusal(data.encode("utf-8", "surrogatepass"), max_depth)
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise JSONInputError(NOT_UTF8) from None
        refusal = nesting_refusal(raw, max_depth)
    if refusal is not None:
        raise JSONInputError(refusal, f"brackets nested deeper than {max_depth}" if refusal == TOO_DEEP
                             else "brackets do not balance")
    try:
        return text, _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise JSONInputError(NOT_JSON, type(exc).__name__) from None


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> object:
    """The value `data` holds, or JSONInputError."""
    return loads_with_text(data, max_bytes=max_bytes, max_depth=max_depth)[1]
