"""Offsets: Redis stream ids "{ms}-{seq}", strictly increasing across all
rooms and instances; they compare numerically (`offset_key`), never as text."""

from __future__ import annotations

import re
from dataclasses import dataclass

ZERO_OFFSET = "0-0"
_OFFSET_RE = re.compile(r"\A([0-9]{1,16})-([0-9]{1,16})\Z")
_MAX_ID_PART = 2**53  # Lua compares ids as doubles: keep them exact


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    offset: str
    event: str
    data: bytes


def parse_offset(offset: object) -> tuple[int, int] | None:
    """(ms, seq) of a well-formed offset, else None. Input may be hostile."""
    if not isinstance(offset, str):
        return None
    m = _OFFSET_RE.match(offset)
    if not m:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms >= _MAX_ID_PART or seq >= _MAX_ID_PART:
        return None
    return ms, seq


def offset_key(offset: str) -> tuple[int, int]:
    """Sort key of an offset produced by this package."""
    parsed = parse_offset(offset)
    if parsed is None:
        raise ValueError("not an offset")
    return parsed
