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
from functools import lru_cache

from channels_common.redis_line import RedisLine
from channels_common.resp import pack_command
from channels_common.tasks import spawn
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
# While updates stream in (an exchange started less than
# APPEND_STREAMING_SECONDS ago), the next one waits until APPEND_LINGER_SECONDS
# after it, so that one write carries several appends: each exchange costs a
# write and a read on both sides, more than the append script's own work.
# Acks wait that much longer; propagation to the peers does not (it comes
# before the append). An update after a quiet spell is sent at once.
APPEND_STREAMING_SECONDS = 0.01
APPEND_LINGER_SECONDS = 0.002
# Awareness updates waiting for Redis, at most (awareness is a live view:
# an outage may drop some, the providers renew their state every 15 s).
MAX_QUEUED_AWARENESS = 10_000


# The append command's variable parts, between its constant ones: log key,
# members key, (instance), update, (ttl), (inbox cap), document name, (inboxes).
_APPEND = b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s%s$%d\r\n%s\r\n%s"


@lru_cache(maxsize=4096)
def _encoded_keys(keys: Keys, name: str) -> tuple[bytes, bytes, bytes]:
    """A document's log key, members key and name as the append sends them
    (encoded once per document, not per update; bounded like the headers)."""
    return keys.log(name).encode(), keys.members(name).encode(), name.encode()


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


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
        self._running = False
        # The next exchange, when one is scheduled (end of turn, linger or
        # backoff); at most one exchange in flight.
        self._handle: asyncio.Handle | None = None
        self._inflight = False
        self._slow: set[asyncio.Task] = set()
        self._last_send = 0.0
        self._attempt = 0

    # ------------------------------------------------------------- queries

    @property
    def busy(self) -> bool:
        """Something is queued or on its way to Redis."""
        return bool(self._queue or self.aw_queue or self.membership.leaving or self._inflight)

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

    def wake(self) -> None:
        """Something was queued: send it at the end of this loop turn, or,
        while updates stream in, with the next batch (APPEND_LINGER_SECONDS)."""
        if not self._running or self._inflight or self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        since = time.monotonic() - self._last_send
        if since < APPEND_STREAMING_SECONDS and since < APPEND_LINGER_SECONDS:
            self._handle = loop.call_later(APPEND_LINGER_SECONDS - since, self._send)
        else:
            self._handle = loop.call_soon(self._send)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._running = True
        self.wake()

    async def stop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        tasks = list(self._slow)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    # ------------------------------------------------------------ exchanges

    def _send(self) -> None:
        """One pipelined exchange of what is queued (at most one in flight).
        The usual case is callbacks only: no task, no future. Opening the
        line or loading the scripts takes the slow path, a task."""
        self._handle = None
        if not self._running or self._inflight:
            return
        batch: list[_Append] = []
        size = 0
        for entry in self._queue:
            if len(batch) >= APPEND_BATCH or size > APPEND_BATCH_BYTES:
                break
            batch.append(entry)
            size += entry.size
        aw = list(itertools.islice(self.aw_queue, APPEND_BATCH))
        leaving = self.membership.take_leaving(APPEND_BATCH)
        if not batch and not aw and not leaving:
            return
        self._last_send = time.monotonic()
        self._inflight = True
        if self.line.ready and self._append.loaded and (self._awareness.loaded or not aw):
            commands, positions = self._commands(batch, aw, leaving)
            if not commands:
                self._sent(batch, aw, leaving, positions, [], None)
                return
            try:
                self.line.start(commands, None,
                                lambda replies, error: self._sent(batch, aw, leaving, positions, replies, error))
            except Exception as exc:  # noqa: BLE001 - whatever failed, the batch is retried
                self._sent(batch, aw, leaving, positions, None, exc)
        else:
            spawn(self._send_slow(batch, aw, leaving), name="collab-append", tasks=self._slow)

    async def _send_slow(self, batch: list[_Append], aw: list, leaving: list[str]) -> None:
        positions: list[tuple[int, str]] = []
        try:
            await self._append.sha(self.redis)
            if aw:
                await self._awareness.sha(self.redis)
            commands, positions = self._commands(batch, aw, leaving)
            replies, error = (await self.line.run(commands) if commands else []), None
        except asyncio.CancelledError:
            self._inflight = False
            raise
        except (RedisError, OSError) as exc:
            raise_if_cancelled()
            replies, error = None, exc
        except Exception as exc:  # a bug of ours must not stop every document's appends
            log.exception("append exchange failed")
            replies, error = None, exc
        self._sent(batch, aw, leaving, positions, replies, error)

    def _commands(self, batch: list[_Append], aw: list[tuple[str, bytes, bytes]],
                  leaving: list[str]) -> tuple[list[bytes], list[tuple[int, str]]]:
        append_sha, awareness_sha = self._append.loaded, self._awareness.loaded
        commands: list[bytes] = []
        k = self.keys
        inboxes = k.inbox_prefix()
        now = time.monotonic()
        positions: list[tuple[int, str]] = []
        # The append command, as pack_command would write it, with its
        # constant parts encoded once per exchange.
        head = b"*11\r\n$7\r\nEVALSHA\r\n" + _bulk(append_sha.encode()) + b"$1\r\n2\r\n"
        instance = _bulk(self._instance_b)
        tail = _bulk(b"%d" % self.inbox_maxlen)
        inboxes_bulk = _bulk(inboxes.encode())
        due = self.ttls.due_on_append
        with_ttl, no_ttl = _bulk(b"%d" % self.ttls.ms), _bulk(b"0")
        for entry in batch:
            update = entry.update
            if update is None:
                continue
            name = entry.name
            log_key, members_key, name_b = _encoded_keys(k, name)
            positions.append((len(commands), name))
            commands.append(_APPEND % (
                head, len(log_key), log_key, len(members_key), members_key, instance, len(update), update,
                # A key written here must never outlive the TTL (a crash
                # before the next compaction must not leave it forever).
                with_ttl if due(name, now) else no_ttl,
                tail, len(name_b), name_b, inboxes_bulk,
            ))
        for name, kind, update in aw:
            commands.append(pack_command(
                "EVALSHA", awareness_sha, 1, k.members(name), self._instance_b, kind, update,
                self.inbox_maxlen, name, inboxes,
            ))
        for name in leaving:
            commands.append(pack_command("ZREM", k.members(name), self._instance_b))
        return commands, positions

    def _sent(self, batch: list[_Append], aw: list, leaving: list[str], positions: list[tuple[int, str]],
              replies: list | None, error: BaseException | None) -> None:
        self._inflight = False
        try:
            if error is None:
                for result in replies:
                    if isinstance(result, NoScriptError):
                        # Redis restarted or was flushed: load them, then retry.
                        self._append.forget()
                        self._awareness.forget()
                    if isinstance(result, RedisError):
                        error = result
                        break
            if error is not None:
                self._failed(leaving, error)
                return
            if not self.health.append_ok:
                log.info("redis answers again; queued edits appended", extra={"updates": self.unacked_updates})
            self._attempt = 0
            self.health.append_ok = True
            self.membership.sent(leaving, ok=True)
            for index, name in positions:
                if self._is_open(name):
                    self._appended[name] = id_text(replies[index])
            if positions:
                self.metrics.updates_appended.inc(len(positions))
            for _ in aw:
                self.aw_queue.popleft()
            self._done(batch)
        except Exception:
            # A bug of ours must not stop every document's appends.
            log.exception("append bookkeeping failed")
        if self._queue or self.aw_queue or self.membership.leaving:
            self.wake()

    def _failed(self, leaving: list[str], error: BaseException) -> None:
        self.membership.sent(leaving, ok=False)
        self.health.failed("append", error)
        self.health.append_ok = False
        self._attempt += 1
        if self._running:
            self._handle = asyncio.get_running_loop().call_later(backoff(self._attempt), self._send)

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
