"""Where the recovery state lives in Redis (see the package docstring)."""

from __future__ import annotations

import hashlib


class Keys:
    __slots__ = ("last", "prefix", "room_prefix", "trim_prefix")

    def __init__(self, prefix: str = "recovery:"):
        self.prefix = prefix
        self.last = prefix + "last"
        self.room_prefix = prefix + "room:"
        self.trim_prefix = prefix + "trim:"

    def room(self, room: str) -> str:
        return self.room_prefix + room

    def trim(self, room: str) -> str:
        return self.trim_prefix + room

    def session(self, pid: str) -> str:
        # The pid itself is not stored: reading Redis reveals no pid.
        return self.prefix + "session:" + hashlib.sha256(pid.encode()).hexdigest()

    def dedup(self, room: str, event: str, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(room.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(event.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(data)
        return self.prefix + "dedup:" + h.hexdigest()
