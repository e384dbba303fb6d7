"""This instance's view of Redis, as the document registry sees it: one
facade wiring the concerns below, each owning its state; nothing else here.

- `appender`: client updates into the logs, acknowledged once appended;
  awareness out; membership removals (one pipelined line, one task);
- `reader`: the blocking read of this instance's inbox (one task, its own
  connection), loads and catch-ups first, gap checks; `positions`: how far
  each open document's log is applied, and delivery to the `Listener`;
- `membership`: registrations with each load, their renewal (one task);
- `compaction`: leased compactions covering our own appends, and TTLs;
- `health`: the liveness flags and the Redis configuration check.

While Redis is unreachable nothing is dropped: appends wait in memory (their
acknowledgements with them) up to `max_unacked_bytes`, beyond which the
listener is told to stop reading the sockets of the documents concerned;
`healthy` is False (readyz says 503) until appends and reads work again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from channels_common.redis import create_redis
from channels_common.tasks import spawn

from ..metrics import CollabMetrics
from ..snapshot import Keys, Loaded
from .appender import (
    APPEND_BATCH,
    APPEND_BATCH_BYTES,
    APPEND_TIMEOUT_SECONDS,
    INBOX_MAXLEN,
    MAX_QUEUED_AWARENESS,
    Appender,
)
from .compaction import CATCH_UP_SECONDS, LEASE_MS, TTL_REFRESH_SECONDS, Compactor, Ttls
from .health import Health
from .membership import MEMBER_REFRESH_SECONDS, MEMBER_TTL_MS, REGISTER_BATCH, Membership
from .positions import Listener, Positions, Tracked
from .reader import (
    READ_BLOCK_MS,
    READ_COALESCE_SECONDS,
    READ_COUNT,
    READ_STREAMING_SECONDS,
    InboxReader,
    stream_entries,
)

__all__ = [
    "APPEND_BATCH", "APPEND_BATCH_BYTES", "APPEND_TIMEOUT_SECONDS", "CATCH_UP_SECONDS", "INBOX_MAXLEN",
    "LEASE_MS", "MAX_QUEUED_AWARENESS", "MEMBER_REFRESH_SECONDS", "MEMBER_TTL_MS", "READ_BLOCK_MS",
    "READ_COALESCE_SECONDS", "READ_COUNT", "READ_STREAMING_SECONDS", "REGISTER_BATCH", "TTL_REFRESH_SECONDS",
    "Cluster", "Listener", "Tracked", "stream_entries",
]

log = logging.getLogger("channels.collab.cluster")


class Cluster:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "collab:",
        ttl_seconds: float = 86400,
        max_unacked_bytes: int = 64 * 1024 * 1024,
        metrics: CollabMetrics | None = None,
        instance_id: str | None = None,
        redis=None,
        inbox_maxlen: int = INBOX_MAXLEN,
        member_ttl_ms: int = MEMBER_TTL_MS,
    ):
        self.url = url
        self.keys = Keys(prefix)
        self.metrics = metrics or CollabMetrics()
        self.instance = instance_id or secrets.token_hex(6)
        instance = self.instance.encode()
        self.inbox = self.keys.inbox(self.instance)
        self.redis = redis if redis is not None else create_redis(url, max_connections=8)
        self._own_redis = redis is None
        self._listener: Listener | None = None
        self._tasks: list[asyncio.Task] = []
        self.ttl_ms = ttl_ms = max(1000, int(ttl_seconds * 1000))
        self.inbox_maxlen = inbox_maxlen
        self.max_unacked_bytes = max_unacked_bytes

        self.health = Health(self.redis)
        self.positions = Positions(instance, self.metrics)
        self.reader = InboxReader(url, self.redis, self.keys, self.inbox, self.positions, self.health, self.load)
        self.membership = Membership(self.redis, self.keys, self.inbox, instance, self.positions,
                                     self.reader.changed, member_ttl_ms)
        self.ttls = Ttls(self.redis, self.keys, ttl_ms)
        self.appender = Appender(self.redis, self.keys, inbox_maxlen, instance, max_unacked_bytes,
                                 self.membership, self.ttls, self.positions.is_open, self.health, self.metrics)
        self.compactor = Compactor(self.redis, self.keys, self.inbox, instance, ttl_ms, self.positions,
                                   self.appender, self.metrics)

        # The registry's per-update calls go straight to the appender (no
        # delegating frame on the hot path): append(name, update, ack) queues
        # `update` for the log of `name`, `ack` runs once it and everything
        # before it is in Redis (None: only wait for those).
        self.append = self.appender.append
        self.publish_awareness = self.appender.publish_awareness
        self.pending_updates = self.appender.pending_updates

        m = self.metrics
        m.unacked_updates.set_function(lambda: self.appender.unacked_updates)
        m.unacked_bytes.set_function(lambda: self.appender.unacked_bytes)
        m.stored_drafts.set_function(self.compactor.draft_count)
        m.redis_up.set_function(lambda: 1 if self.healthy else 0)

    # ------------------------------------------------------------ lifecycle

    @property
    def listener(self) -> Listener | None:
        return self._listener

    @listener.setter
    def listener(self, listener: Listener | None) -> None:
        self._listener = self.reader.listener = self.appender.listener = listener

    @property
    def healthy(self) -> bool:
        """Appends and reads work, and the unacknowledged bound is not hit."""
        return self.health.append_ok and self.health.reader_live and not self.appender.backpressured

    @property
    def ever_failed(self) -> bool:
        return self.health.ever_failed

    def start(self) -> None:
        self.appender.start()
        self._tasks.append(spawn(self.reader.run(), name="collab-read"))
        self._tasks.append(spawn(self.membership.run(), name="collab-members"))

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued append, awareness update and compaction is
        in Redis (True), or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                while self.appender.busy:
                    await asyncio.sleep(0.01)
                pending = list(self.compactor.tasks)
                if pending:
                    await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        tasks = [*self._tasks, *self.compactor.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a connection torn down mid-read must not hold up the exit.
            await asyncio.wait(tasks, timeout=2.0)
        await self.appender.stop()
        await self.appender.line.aclose()
        if self._own_redis:
            try:
                await asyncio.wait_for(self.redis.aclose(), 2.0)
            except (Exception, TimeoutError) as exc:  # noqa: BLE001 - closing a dead connection may fail
                log.debug("closing redis failed", extra={"error": str(exc)})

    # ------------------------------------------------------- open documents

    async def load(self, name: str) -> Loaded:
        """Snapshot and the log after it, in one atomic read."""
        # Our own appends in flight now may land after the script ran and
        # leave the queue before the caller looks (the reader skips our own
        # entries): they come with the result.
        ours = self.appender.pending_updates(name)
        loaded = await self.membership.load(name)
        loaded.updates += ours
        self.metrics.documents_loaded.inc()
        return loaded

    def track(self, name: str, loaded: Loaded | None) -> None:
        """`name` is open here; read its log after `loaded.cursor`, or load
        it first when it could not be loaded (None)."""
        self.positions.track(name, loaded)
        self.ttls.track(name)
        self.reader.changed()

    def untrack(self, name: str) -> None:
        self.appender.forget(name)
        self.ttls.untrack(name)
        if self.positions.untrack(name):
            self.reader.changed()
            # No more of its updates to this inbox (left to expire if Redis is down).
            self.membership.leave((name,))
            self.appender.wake()

    def leave_all(self) -> None:
        """Shutting down: remove this instance from every open document's
        members (with the next append pipeline; `flush` waits for it)."""
        self.membership.leave(self.positions.tracked)
        self.appender.wake()

    def cursor(self, name: str) -> str | None:
        return self.positions.cursor(name)

    async def refresh_membership(self) -> None:
        await self.membership.refresh()

    async def refresh_ttls(self) -> None:
        await self.ttls.refresh()

    # ------------------------------------------------------------- updates

    @property
    def backpressured(self) -> bool:
        return self.appender.backpressured

    @property
    def unacked_updates(self) -> int:
        return self.appender.unacked_updates

    @property
    def unacked_bytes(self) -> int:
        return self.appender.unacked_bytes

    # ---------------------------------------------------------- compaction

    def compact(self, name: str, snapshot: Callable[[], bytes | None], lease: bool = True) -> None:
        self.compactor.compact(name, snapshot, lease)

    async def compact_to(self, name: str, state: bytes, covers: str) -> bool:
        return await self.compactor.compact_to(name, state, covers)

    @property
    def drafts(self) -> dict[str, float]:
        return self.compactor.drafts

    # ---------------------------------------- settings and state, as before

    @property
    def member_ttl_ms(self) -> int:
        return self.membership.member_ttl_ms

    @member_ttl_ms.setter
    def member_ttl_ms(self, value: int) -> None:
        self.membership.member_ttl_ms = value

    @property
    def wakeups(self) -> int:
        return self.reader.wakeups

    # The names below are the old module's private state, kept readable for
    # the tests that inspect it; each belongs to the concern it returns from.

    @property
    def _tracked(self) -> dict[str, Tracked]:
        return self.positions.tracked

    @property
    def _unsettled(self) -> set[str]:
        return self.positions.unsettled

    @property
    def _inbox_cursor(self) -> str | None:
        return self.positions.inbox_cursor

    @_inbox_cursor.setter
    def _inbox_cursor(self, value: str | None) -> None:
        self.positions.inbox_cursor = value

    @property
    def _aw_queue(self):
        return self.appender.aw_queue

    @property
    def _compacting(self) -> set[str]:
        return self.compactor.compacting

    @property
    def _compactions(self) -> set[asyncio.Task]:
        return self.compactor.tasks

    def _deliver_inbox(self, entries) -> None:
        self.positions.deliver_inbox(entries, self._listener)
