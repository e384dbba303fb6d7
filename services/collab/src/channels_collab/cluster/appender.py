"""The appender: client updates in order into their documents' logs (each
acknowledged only once Redis holds it and all before it), awareness to the
other members' inboxes, and membership removals, pipelined on one line.

While Redis is unreachable nothing is dropped: appends wait in memory up to
`max_unacked_bytes`, beyond which the listener pauses their documents' sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

from channels_common.redis_line import RedisLine
from channels_common.resp import pack_command
from redis.exceptions import NoScriptError, RedisError

from ..metrics import CollabMetrics
from ..snapshot import APPEND_SCRIPT, AWARENESS_SCRIPT, Keys, id_text
from .compaction import Ttls
from .health import Health, backoff, raise_if_cancelled
from .membership import Membership
from .positions import Listener
from .scripts import Script

log = logging.getLogger("channels.collab.cluster")

# Entries an inbox keeps (about): a reader further behind catches up from
# the documents' logs.
INBOX_MAXLEN = 10_000
# One pipeline carries at most this many appends / bytes.
APPEND_BATCH = 512
APPEND_BATCH_BYTES = 4 * 1024 * 1024
# As the Redis client's socket timeout: an append batch Redis does not answer
# in this time fails, and is retried on a fresh connection.
APPEND_TIMEOUT_SECONDS = 5.0
# Awareness updates waiting for Redis, at most (awareness is a live view:
# an outage may drop some, the providers renew their state every 15 s).
MAX_QUEUED_AWARENESS = 10_000


class _Append:
    __slots__ = ("ack", "name", "size", "update")

    def __init__(self, name: str, update: bytes | None, ack: Callable[[], None] | None):
        self.name = name
        self.update = update
        self.ack = ack
        self.size = len(update) if update else 0


class Appender:
    def __init__(self, redis, keys: Keys, inbox_maxlen: int, instance: bytes, max_unacked_bytes: int,
                 membership: Membership, ttls: Ttls, is_open: Callable[[str], bool], health: Health,
                 metrics: CollabMetrics):
        self.redis = redis
        self.keys = keys
        self.inbox_maxlen = inbox_maxlen
        self._instance_b = instance
        self.max_unacked_bytes = max_unacked_bytes
        self.membership = membership
        self.ttls = ttls
        self._is_open = is_open
        self.health = health
        self.metrics = metrics
        self.listener: Listener | None = None
        # Appends go over a connection driven by hand: through redis-py's
        # pipeline each batch cost ~250 µs of CPU, most of an update's cost.
        self.line = RedisLine(redis, APPEND_TIMEOUT_SECONDS)
        self._append = Script(APPEND_SCRIPT)
        self._awareness = Script(AWARENESS_SCRIPT)
        # Appends in order; acknowledged (and removed) once in Redis.
        self._queue: deque[_Append] = deque()
        self._unacked_by_doc: dict[str, int] = {}
        self.unacked_bytes = 0
        self.unacked_updates = 0
        self.backpressured = False
        self.aw_queue: deque[tuple[str, bytes, bytes]] = deque()
        # Id of this instance's last append per open document: a compaction
        # waits for the reader to pass it, so that it covers its own edits.
        self._appended: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------- queries

    @property
    def busy(self) -> bool:
        """Something is queued or on its way to Redis."""
        return bool(self._queue or self.aw_queue or self.membership.leaving or not self._idle.is_set())

    def pending_updates(self, name: str) -> list[bytes]:
        """Updates for `name` still waiting to be appended (a reload must
        not lose them: the reader skips this instance's own entries)."""
        if not self._unacked_by_doc.get(name):
            return []
        return [a.update for a in self._queue if a.name == name and a.update]

    def has_pending(self, name: str) -> bool:
        return bool(self._unacked_by_doc.get(name))

    def last_append(self, name: str) -> str | None:
        return self._appended.get(name)

    def forget(self, name: str) -> None:
        self._appended.pop(name, None)

    # ------------------------------------------------------------- queueing

    def wake(self) -> None:
        """Something was queued: the task writes it (and is busy until then)."""
        self._idle.clear()
        self._wake.set()

    def nudge(self) -> None:
        self._wake.set()

    def append(self, name: str, update: bytes | None, ack: Callable[[], None] | None) -> None:
        """Queue `update` for the log of `name`; `ack` runs once it (and
        everything queued before it) is in Redis. None: only wait for those."""
        entry = _Append(name, update, ack)
        self._queue.append(entry)
        if update:
            self.unacked_updates += 1
            self.unacked_bytes += entry.size
            self._unacked_by_doc[name] = self._unacked_by_doc.get(name, 0) + 1
            if not self.backpressured and self.unacked_bytes > self.max_unacked_bytes:
                self.backpressured = True
                log.warning(
                    "unacknowledged updates over the bound; pausing the sockets of their documents",
                    extra={"unacked_bytes": self.unacked_bytes},
                )
                if self.listener is not None:
                    self.listener.backpressure(True, list(self._unacked_by_doc))
        self.wake()

    def publish_awareness(self, name: str, update: bytes, kind: bytes = b"a") -> None:
        if len(self.aw_queue) >= MAX_QUEUED_AWARENESS:
            self.aw_queue.popleft()
        self.aw_queue.append((name, kind, update))
        self.wake()

    # ----------------------------------------------------------------- task

    async def run(self) -> None:
        attempt = 0
        while True:
            if not self._queue and not self.aw_queue and not self.membership.leaving:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Append] = []
            size = 0
            for entry in self._queue:
                if len(batch) >= APPEND_BATCH or size > APPEND_BATCH_BYTES:
                    break
                batch.append(entry)
                size += entry.size
            aw = list(itertools.islice(self.aw_queue, APPEND_BATCH))
            leaving = self.membership.take_leaving(APPEND_BATCH)
            try:
                await self._write(batch, aw, leaving)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self.membership.sent(leaving, ok=False)
                self.health.failed("append", exc)
                self.health.append_ok = False
                attempt += 1
                await asyncio.sleep(backoff(attempt))
                continue
            if not self.health.append_ok:
                log.info("redis answers again; queued edits appended", extra={"updates": self.unacked_updates})
            attempt = 0
            self.health.append_ok = True
            self.membership.sent(leaving, ok=True)
            for _ in aw:
                self.aw_queue.popleft()
            self._done(batch)

    async def _write(self, batch: list[_Append], aw: list[tuple[str, bytes, bytes]], leaving: list[str]) -> None:
        append_sha = await self._append.sha(self.redis)
        awareness_sha = await self._awareness.sha(self.redis) if aw else None
        commands: list[bytes] = []
        k = self.keys
        inboxes = k.inbox_prefix()
        now = time.monotonic()
        positions: list[tuple[int, str]] = []
        for entry in batch:
            if entry.update is None:
                continue
            # A key written here must never outlive the TTL (a crash
            # before the next compaction must not leave it forever).
            ttl = self.ttls.ms if self.ttls.due_on_append(entry.name, now) else 0
            positions.append((len(commands), entry.name))
            commands.append(pack_command(
                "EVALSHA", append_sha, 2, k.log(entry.name), k.members(entry.name), self._instance_b,
                entry.update, ttl, self.inbox_maxlen, entry.name, inboxes,
            ))
        for name, kind, update in aw:
            commands.append(pack_command(
                "EVALSHA", awareness_sha, 1, k.members(name), self._instance_b, kind, update,
                self.inbox_maxlen, name, inboxes,
            ))
        for name in leaving:
            commands.append(pack_command("ZREM", k.members(name), self._instance_b))
        if commands:
            results = await self.line.run(commands)
            for result in results:
                if isinstance(result, NoScriptError):
                    # Redis restarted or was flushed: load them, then retry.
                    self._append.forget()
                    self._awareness.forget()
                    raise result
                if isinstance(result, RedisError):
                    raise result
            for index, name in positions:
                if self._is_open(name):
                    self._appended[name] = id_text(results[index])
        if positions:
            self.metrics.updates_appended.inc(len(positions))

    def _done(self, batch: list[_Append]) -> None:
        for entry in batch:
            self._queue.popleft()
            if entry.update:
                self.unacked_updates -= 1
                self.unacked_bytes -= entry.size
                left = self._unacked_by_doc.get(entry.name, 1) - 1
                if left:
                    self._unacked_by_doc[entry.name] = left
                else:
                    self._unacked_by_doc.pop(entry.name, None)
            if entry.ack is not None:
                try:
                    entry.ack()
                except Exception:
                    log.exception("acknowledgement failed", extra={"document": entry.name})
        if self.backpressured and self.unacked_bytes <= self.max_unacked_bytes // 2:
            self.backpressured = False
            log.info("unacknowledged updates under the bound again; sockets resume")
            if self.listener is not None:
                self.listener.backpressure(False, ())
