"""Compaction (snapshot a document's state, trim what it covers) under a
short lease, covering this instance's own appends; and the TTLs that keep an
open document's keys alive, and let a crashed instance's expire.

The drafts this instance wrote are counted for the stored-drafts gauge.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from channels_common.tasks import spawn
from redis.exceptions import RedisError

from ..metrics import CollabMetrics
from ..snapshot import COMPACT_SCRIPT, Keys, parse_id
from .positions import Positions
from .reader import inbox_end
from .scripts import Script

if TYPE_CHECKING:
    from .appender import Appender

log = logging.getLogger("channels.collab.cluster")

LEASE_MS = 2000
# A compaction waits this long for the reader to pass this instance's own
# appends, and comes back after as long when it could not.
CATCH_UP_SECONDS = 0.5
# Refresh the TTL of an open document's keys at most this often per document.
TTL_REFRESH_SECONDS = 60.0


class _Ttl:
    __slots__ = ("on_append", "refreshed")

    def __init__(self, now: float):
        self.refreshed = now
        # Its first append sets the TTL: the key may not have existed before.
        self.on_append = True


class Ttls:
    """When each open document's keys last had their TTL set."""

    def __init__(self, redis, keys: Keys, ttl_ms: int):
        self.redis = redis
        self.keys = keys
        self.ms = ttl_ms
        self._open: dict[str, _Ttl] = {}

    def track(self, name: str) -> None:
        self._open[name] = _Ttl(time.monotonic())

    def untrack(self, name: str) -> None:
        self._open.pop(name, None)

    def due_on_append(self, name: str, now: float) -> bool:
        """Whether an append of `name` now sets the TTL (and counts as a refresh)."""
        t = self._open.get(name)
        if t is None:
            return True
        if t.on_append or now - t.refreshed > TTL_REFRESH_SECONDS:
            t.refreshed, t.on_append = now, False
            return True
        return False

    async def refresh(self) -> None:
        """Keep the keys of documents open here from expiring, however long
        they stay open without an edit."""
        now = time.monotonic()
        due = [n for n, t in self._open.items() if now - t.refreshed > TTL_REFRESH_SECONDS]
        if not due:
            return
        pipe = self.redis.pipeline(transaction=False)
        for name in due:
            pipe.pexpire(self.keys.log(name), self.ms)
            pipe.pexpire(self.keys.snap(name), self.ms)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("ttl refresh failed", extra={"error": str(exc)})
            return
        for name in due:
            t = self._open.get(name)
            if t is not None:
                t.refreshed = now


class Compactor:
    def __init__(self, redis, keys: Keys, inbox: str, instance: bytes, ttl_ms: int, positions: Positions,
                 appender: Appender, metrics: CollabMetrics):
        self.redis = redis
        self.keys = keys
        self.inbox = inbox
        self._instance_b = instance
        self.ttl_ms = ttl_ms
        self.positions = positions
        self.appender = appender
        self.metrics = metrics
        self._script = Script(COMPACT_SCRIPT)
        self.compacting: set[str] = set()
        self._again: dict[str, Callable[[], bytes | None]] = {}
        self.tasks: set[asyncio.Task] = set()
        # Documents this instance wrote a draft of: name -> monotonic expiry.
        self.drafts: dict[str, float] = {}

    async def compact_to(self, name: str, state: bytes, covers: str) -> bool:
        """Make `state` the snapshot covering the log up to `covers`, unless
        the snapshot already covers that far."""
        k = self.keys
        written = await self._script.run(self.redis, [k.snap(name), k.log(name)], [state, covers, self.ttl_ms])
        return bool(written)

    def compact(self, name: str, snapshot: Callable[[], bytes | None], lease: bool = True) -> None:
        """Compact `name` in the background. With `lease`, first take the
        document's lease and skip if another instance holds it; `snapshot`
        is called then, with the reader position taken at the same moment.
        Without, the state is taken now (the document is being unloaded)."""
        if lease:
            if name in self.compacting:
                self._again[name] = snapshot  # once this one is done
                return
            spawn(self._compact_leased(name, snapshot), name="collab-compact", tasks=self.tasks)
        else:
            covers = self.positions.cursor(name)
            if covers is None:
                return
            # Whether the reader had applied all its inbox then: if so, and
            # nothing came into the inbox since, the state covers this
            # instance's own appends too.
            seen = self.positions.seen(name)
            appended = self.appender.last_append(name)
            state = snapshot()
            if state is None:
                return
            spawn(self._compact(name, state, covers, appended, seen), name="collab-compact", tasks=self.tasks)

    async def _compact_leased(self, name: str, snapshot: Callable[[], bytes | None], retry: bool = True) -> None:
        self.compacting.add(name)
        lease = self.keys.lease(name)
        try:
            try:
                got = await self.redis.set(lease, self._instance_b, nx=True, px=LEASE_MS)
                if not got and await self.redis.get(lease) == self._instance_b:
                    got = True
            except (RedisError, OSError) as exc:
                log.debug("compaction lease failed", extra={"document": name, "error": str(exc)})
                self.metrics.compactions.labels("failed").inc()
                return
            if not got:
                self.metrics.compactions.labels("leased_elsewhere").inc()
                if retry:
                    # The holder compacts up to its own position; what came
                    # after is ours to compact once its lease has gone.
                    loop = asyncio.get_running_loop()
                    loop.call_later(LEASE_MS / 1000, lambda: self._retry(name, snapshot))
                return
            await self._caught_up(name)
            covers = self.positions.cursor(name)
            state = snapshot() if covers is not None else None
            if state is None:
                return
            await self._compact(name, state, covers)
            appended = self.appender.last_append(name)
            if self.appender.has_pending(name) or (appended is not None and parse_id(appended) > parse_id(covers)):
                # Our own later edits are (or will be) in the log only; nothing
                # else would bring them into a snapshot if nobody types again.
                asyncio.get_running_loop().call_later(CATCH_UP_SECONDS, lambda: self._retry(name, snapshot))
        finally:
            self.compacting.discard(name)
            again = self._again.pop(name, None)
            if again is not None and self.positions.is_open(name):
                self.compact(name, again)

    def _retry(self, name: str, snapshot: Callable[[], bytes | None]) -> None:
        if self.positions.is_open(name):
            if name in self.compacting:
                self._again[name] = snapshot
                return
            spawn(self._compact_leased(name, snapshot, retry=False), name="collab-compact", tasks=self.tasks)

    async def _caught_up(self, name: str, timeout: float = CATCH_UP_SECONDS) -> None:
        """Move `name`'s position past this instance's last append, once the
        reader has applied everything the inbox held after it (briefly).

        Our own appends never come back through the inbox; any other
        instance's update before one of them was in the inbox (one script
        wrote both) by the time it was acknowledged, so it is applied once
        the reader has passed the inbox's end as read after the ack."""
        appended, cursor = self.appender.last_append(name), self.positions.cursor(name)
        if appended is None or cursor is None or parse_id(cursor) >= parse_id(appended):
            return
        try:
            mark = await inbox_end(self.redis, self.inbox)
        except (RedisError, OSError) as exc:
            log.debug("inbox position unknown", extra={"error": str(exc)})
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.positions.pass_own(name, appended, mark):
                return
            await asyncio.sleep(0.005)

    async def _compact(self, name: str, state: bytes, covers: str, appended: str | None = None,
                       seen: str | None = None) -> None:
        try:
            # As `_caught_up`, for a document leaving: when nothing arrived
            # unread since, its state holds this instance's appends too.
            if (appended is not None and seen is not None and parse_id(appended) > parse_id(covers)
                    and parse_id(await inbox_end(self.redis, self.inbox)) <= parse_id(seen)):
                covers = appended
            written = await self.compact_to(name, state, covers)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.debug("compaction failed", extra={"document": name, "error": str(exc)})
            self.metrics.compactions.labels("failed").inc()
            return
        self.metrics.compactions.labels("written" if written else "stale").inc()
        if written:
            self.metrics.drafts_saved.inc()
            self.drafts[name] = time.monotonic() + self.ttl_ms / 1000

    def draft_count(self) -> int:
        now = time.monotonic()
        if len(self.drafts) > 1000 or random.random() < 0.05:
            for name in [n for n, expiry in self.drafts.items() if expiry < now]:
                del self.drafts[name]
        return sum(1 for expiry in self.drafts.values() if expiry >= now)
