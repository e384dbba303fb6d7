"""Connection-attempt throttling, sans I/O: an address and the time in, allow
or refuse out. Up to `attempts` per sliding `window` seconds per address;
the next one starts a ban of `ban` seconds, during which every attempt is
refused (without extending it); after the ban the address starts afresh.

Invariant: each table holds at most `max_addresses` entries and drops those
whose window or ban has passed, so a flood of distinct addresses costs
bounded memory (the oldest entries go first: throttling turns lenient,
never stricter, for the addresses pushed out).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Under 1 KB per tracked address with 15 attempts: under 10 MB per table.
MAX_ADDRESSES = 10_000


@dataclass(frozen=True, slots=True)
class Refused:
    retry_after: float  # seconds until the ban ends
    ban_started: bool  # this attempt started it (log once per ban, not per attempt)

    @property
    def retry_after_header(self) -> bytes:
        """Retry-After takes whole seconds; round up so a client that obeys it is let in."""
        return b"%d" % max(1, math.ceil(self.retry_after))


class Throttle:
    def __init__(self, attempts: int, window: float, ban: float, clock: Callable[[], float],
                 max_addresses: int = MAX_ADDRESSES):
        if attempts < 1 or window <= 0 or ban <= 0 or max_addresses < 1:
            raise ValueError("throttle needs attempts >= 1, window > 0, ban > 0, max_addresses >= 1")
        self.attempts = attempts
        self.window = window
        self.ban = ban
        self.clock = clock
        self.max_addresses = max_addresses
        # address -> times of its attempts in the window, oldest first;
        # ordered by latest attempt, so the front is the first to expire.
        self._recent: OrderedDict[str, list[float]] = OrderedDict()
        # address -> end of its ban; ordered by start, and every ban lasts
        # as long, so the front is the first to end.
        self._banned: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent) + len(self._banned)

    def attempt(self, address: str) -> Refused | None:
        """Count one connection attempt from `address`: None to let it in."""
        now = self.clock()
        self._expire(now)
        until = self._banned.get(address)
        if until is not None:
            return Refused(until - now, ban_started=False)
        times = self._recent.pop(address, None)
        if times is None:
            times = []
        else:
            start = self._first_in_window(times, now - self.window)
            if start:
                del times[:start]
        if len(times) >= self.attempts:
            self._banned[address] = now + self.ban
            if len(self._banned) > self.max_addresses:
                self._banned.popitem(last=False)
            return Refused(self.ban, ban_started=True)
        times.append(now)
        self._recent[address] = times
        if len(self._recent) > self.max_addresses:
            self._recent.popitem(last=False)
        return None

    @staticmethod
    def _first_in_window(times: list[float], horizon: float) -> int:
        for i, t in enumerate(times):
            if t > horizon:
                return i
        return len(times)

    def _expire(self, now: float) -> None:
        # Amortised O(1) per attempt: each entry is dropped once.
        recent, horizon = self._recent, now - self.window
        while recent:
            address, times = next(iter(recent.items()))
            if times[-1] > horizon:
                break
            del recent[address]
        banned = self._banned
        while banned:
            address, until = next(iter(banned.items()))
            if until > now:
                break
            del banned[address]
