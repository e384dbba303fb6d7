"""Ephemeral drafts, as the original's anonymous in-memory SQLite: Rails is
the source of truth, so a draft only has to outlive a page reload and the
document being unloaded, for as long as the process lives.

`Debounce` decides when a live document is stored (5 s after the last change,
at most 30 s after the first unstored one); `DraftStore` holds the stored
states, bounded by count (least recently used goes first) and idle age."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import EMPTY_UPDATE


class Debounce:
    """Pure timing: feed it change times, ask it when the store is due."""

    __slots__ = ("delay", "first_change", "last_change", "max_delay")

    def __init__(self, delay: float, max_delay: float):
        self.delay = delay
        self.max_delay = max(max_delay, delay)
        self.first_change: float | None = None
        self.last_change: float | None = None

    @property
    def pending(self) -> bool:
        return self.first_change is not None

    def changed(self, now: float) -> float:
        """Record a change; return the new deadline."""
        if self.first_change is None:
            self.first_change = now
        self.last_change = now
        return self.deadline

    @property
    def deadline(self) -> float | None:
        if self.first_change is None:
            return None
        return min(self.last_change + self.delay, self.first_change + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def stored(self) -> None:
        self.first_change = self.last_change = None


@dataclass(slots=True)
class Draft:
    state: bytes
    touched: float


class DraftStore:
    def __init__(self, max_drafts: int, max_idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_drafts = max(0, max_drafts)
        self.max_idle = max_idle_seconds
        self.clock = clock
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self.evicted = 0  # drafts dropped by a bound, for the metrics

    def __len__(self) -> int:
        return len(self._drafts)

    def __contains__(self, name: str) -> bool:
        return name in self._drafts

    @property
    def total_bytes(self) -> int:
        return sum(len(d.state) for d in self._drafts.values())

    def put(self, name: str, state: bytes) -> None:
        """Store a document's full state (a Yjs update from the empty doc).
        An empty document needs no draft."""
        if state == EMPTY_UPDATE:
            self._drafts.pop(name, None)
            return
        self._drafts[name] = Draft(state, self.clock())
        self._drafts.move_to_end(name)
        while len(self._drafts) > self.max_drafts:
            self._drafts.popitem(last=False)
            self.evicted += 1

    def get(self, name: str) -> bytes | None:
        draft = self._drafts.get(name)
        if draft is None:
            return None
        now = self.clock()
        if now - draft.touched > self.max_idle:
            del self._drafts[name]
            self.evicted += 1
            return None
        draft.touched = now
        self._drafts.move_to_end(name)
        return draft.state

    def sweep(self) -> int:
        """Drop drafts idle longer than the bound. Least recently used come
        first in the ordered dict, so the scan stops at the first fresh one."""
        cutoff = self.clock() - self.max_idle
        removed = 0
        while self._drafts:
            name, draft = next(iter(self._drafts.items()))
            if draft.touched >= cutoff:
                break
            del self._drafts[name]
            removed += 1
        self.evicted += removed
        return removed
