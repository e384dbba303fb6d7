"""Where the recovery state lives in Redis (see the package docstring)."""

from __future__ import annotations

import hashlib


class Keys:
    __slots__ = ("epoch", "last", "prefix", "room_prefix", "trim_prefix")

    def __init__(self, prefix: str = "recovery:"):
        self.prefix = prefix
        self.last = prefix + "last"
        # The subscription epoch counter, and the channel its markers go to.
        self.epoch = prefix + "epoch"
        self.room_prefix = prefix + "room:"
        self.trim_prefix = prefix + "trim:"

    def room(self, room: str) -> str:
        return self.room_prefix + room

    def trim(self, room: str) -> str:
        return self.trim_prefix + room

    def session(self, pid: str) -> str:
        # The pid itself is not stored: reading Redis reveals no pid.
        return self.prefix + "session:" + hashlib.sha256(pid.encode()).hexdigest()

    def dedup(self, room: str, event: str, data: bytes, epoch: int | None = None) -> str:
        """One payload's occurrences; within one subscription epoch when
        `epoch` is given (see EventLog.set_epoch)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(room.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(event.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(data)
        if epoch is None:
            return self.prefix + "dedup:" + h.hexdigest()
        return f"{self.prefix}dedup:{epoch}:{h.hexdigest()}"
