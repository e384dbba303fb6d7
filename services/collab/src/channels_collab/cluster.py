"""This instance's view of Redis: append client updates (acknowledged only
once appended), membership of the documents open here, one blocking reader
of this instance's own inbox, catch-up and gap reloads from the documents'
logs, compaction, awareness across instances.

Pure bookkeeping is synchronous; the I/O is four tasks: the appender (the
append script, pipelined, and membership removals), the reader (XREAD BLOCK
of the inbox on its own connection), the membership refresher and
compactions. A `Listener` (the document registry) hears what arrives. The
reader wakes only for other instances' updates of documents open here: an
instance alone on a document (the single-instance default) never reads.

While Redis is unreachable nothing is dropped: appends wait in memory (their
acknowledgements with them) up to `max_unacked_bytes`, beyond which the
listener is told to stop reading the sockets of the documents concerned;
`healthy` is False (readyz says 503) until appends and reads work again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from channels_common.redis import create_redis
from channels_common.redis_line import RedisLine
from channels_common.resp import pack_command
from channels_common.tasks import spawn
from redis.exceptions import NoScriptError, RedisError

from .metrics import CollabMetrics
from .snapshot import (
    APPEND_SCRIPT,
    AWARENESS_SCRIPT,
    COMPACT_SCRIPT,
    LOAD_SCRIPT,
    REGISTER_SCRIPT,
    ZERO_ID,
    Keys,
    Loaded,
    fields_of,
    id_text,
    parse_id,
    parse_loaded,
)

log = logging.getLogger("channels.collab.cluster")

# XREAD blocks this long at most; cut short with CLIENT UNBLOCK when a
# document opened here needs loading or catching up.
READ_BLOCK_MS = 2000
READ_COUNT = 1000
# While updates stream in (wakes closer than READ_STREAMING_SECONDS), the
# reader waits READ_COALESCE_SECONDS before reading again, so one XREAD
# takes several entries: each wake-and-reissue costs Redis ~50 µs, more
# than the append itself. An update after a quiet spell is read at once.
READ_STREAMING_SECONDS = 0.01
READ_COALESCE_SECONDS = 0.002
# Entries an inbox keeps (about): a reader further behind catches up from
# the documents' logs.
INBOX_MAXLEN = 10_000
# A registration as a member of an open document lasts this long and is
# renewed this often (one pipeline for every open document); a crashed
# instance gets no more writes once its registrations expire.
MEMBER_TTL_MS = 60_000
MEMBER_REFRESH_SECONDS = 15.0
# Documents per registration script call.
REGISTER_BATCH = 500
# One pipeline carries at most this many appends / bytes.
APPEND_BATCH = 512
APPEND_BATCH_BYTES = 4 * 1024 * 1024
# As the Redis client's socket timeout: an append batch Redis does not answer
# in this time fails, and is retried on a fresh connection.
APPEND_TIMEOUT_SECONDS = 5.0
# Awareness updates waiting for Redis, at most (awareness is a live view:
# an outage may drop some, the providers renew their state every 15 s).
MAX_QUEUED_AWARENESS = 10_000
LEASE_MS = 2000
# A compaction waits this long for the reader to pass this instance's own
# appends, and comes back after as long when it could not.
CATCH_UP_SECONDS = 0.5
# Refresh the TTL of an open document's keys at most this often per document.
TTL_REFRESH_SECONDS = 60.0


class Listener(Protocol):
    def remote_updates(self, name: str, updates: list[bytes]) -> None: ...

    def reload(self, name: str, loaded: Loaded) -> None: ...

    def remote_awareness(self, name: str, update: bytes) -> None: ...

    def awareness_query(self, name: str) -> None: ...

    def backpressure(self, on: bool, names: Iterable[str]) -> None: ...


class _Append:
    __slots__ = ("ack", "name", "size", "update")

    def __init__(self, name: str, update: bytes | None, ack: Callable[[], None] | None):
        self.name = name
        self.update = update
        self.ack = ack
        self.size = len(update) if update else 0


class _Tracked:
    """An open document: how far this instance has applied its log."""

    __slots__ = ("catch_up", "cursor", "gap", "needs_load", "ttl_on_append", "ttl_refreshed")

    def __init__(self, cursor: str | None):
        self.cursor = cursor
        # Not loaded yet (Redis was down), back after an outage, or behind
        # the trimmed history (`gap`).
        self.needs_load = cursor is None
        self.gap = False
        # Its log after `cursor` is to be read before the inbox is applied to
        # it: the reader may have passed its entries before it was opened here.
        self.catch_up = True
        self.ttl_refreshed = time.monotonic()
        # Its first append sets the TTL: the key may not have existed before.
        self.ttl_on_append = True


def _is_before(a: str, b: str) -> bool:
    return parse_id(a) < parse_id(b)


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
        self.inbox_maxlen = inbox_maxlen
        self.member_ttl_ms = member_ttl_ms
        # The inbox outlives the registrations that fill it.
        self.inbox_ttl_ms = 2 * member_ttl_ms
        self._inbox_cursor: str | None = None
        # Reads of the inbox that returned entries.
        self.wakeups = 0
        self._last_wake = 0.0
        self.ttl_ms = max(1000, int(ttl_seconds * 1000))
        self.max_unacked_bytes = max_unacked_bytes
        self.metrics = metrics or CollabMetrics()
        self.instance = instance_id or secrets.token_hex(6)
        self._instance_b = self.instance.encode()
        self.inbox = self.keys.inbox(self.instance)
        self.redis = redis if redis is not None else create_redis(url, max_connections=8)
        self._own_redis = redis is None
        # Appends go over a connection driven by hand: through redis-py's
        # pipeline each batch cost ~250 µs of CPU, most of an update's cost.
        self._append_line = RedisLine(self.redis, APPEND_TIMEOUT_SECONDS)
        self.listener: Listener | None = None
        self._load_sha: str | None = None
        self._compact_sha: str | None = None
        self._append_sha: str | None = None
        self._awareness_sha: str | None = None
        self._register_sha: str | None = None
        # Documents left here whose membership is still to be removed, and
        # those whose removal is on its way (a load waits for it to land).
        self._unregister: set[str] = set()
        self._unregistering: set[str] = set()
        # Appends in order; acknowledged (and removed) once in Redis.
        self._queue: deque[_Append] = deque()
        self._unacked_by_doc: dict[str, int] = {}
        self.unacked_bytes = 0
        self.unacked_updates = 0
        self.backpressured = False
        self._aw_queue: deque[tuple[str, bytes, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tracked: dict[str, _Tracked] = {}
        # Open documents to load or catch up before the next read (a set, so
        # a read does not scan every open document).
        self._unsettled: set[str] = set()
        # Id of this instance's last append per open document: a compaction
        # waits for the reader to pass it, so that it covers its own edits.
        self._appended: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False
        self._unblock_sent = False
        self._compacting: set[str] = set()
        self._again: dict[str, Callable[[], bytes | None]] = {}
        self._compactions: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self.append_ok = True
        self.reader_live = False
        self.ever_failed = False
        self._warned = False
        # Documents this instance wrote a draft of: name -> monotonic expiry.
        self.drafts: dict[str, float] = {}
        m = self.metrics
        m.unacked_updates.set_function(lambda: self.unacked_updates)
        m.unacked_bytes.set_function(lambda: self.unacked_bytes)
        m.stored_drafts.set_function(self._draft_count)
        m.redis_up.set_function(lambda: 1 if self.healthy else 0)

    # ------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        """Appends and reads work, and the unacknowledged bound is not hit."""
        return self.append_ok and self.reader_live and not self.backpressured

    def start(self) -> None:
        self._tasks.append(spawn(self._append_loop(), name="collab-append"))
        self._tasks.append(spawn(self._read_loop(), name="collab-read"))
        self._tasks.append(spawn(self._member_loop(), name="collab-members"))

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued append, awareness update and compaction is
        in Redis (True), or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                while self._queue or self._aw_queue or self._unregister or not self._idle.is_set():
                    self._wake.set()
                    await asyncio.sleep(0.01)
                pending = list(self._compactions)
                if pending:
                    await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._compactions]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a connection torn down mid-read must not hold up the exit.
            await asyncio.wait(tasks, timeout=2.0)
        await self._append_line.aclose()
        if self._own_redis:
            try:
                await asyncio.wait_for(self.redis.aclose(), 2.0)
            except (Exception, TimeoutError) as exc:  # noqa: BLE001 - closing a dead connection may fail
                log.debug("closing redis failed", extra={"error": str(exc)})

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self.ever_failed or self.append_ok or self.reader_live:
            log.warning("redis unreachable; edits wait in memory", extra={"what": what, "error": str(exc)[:200]})
        self.ever_failed = True

    # ------------------------------------------------------------- scripts

    async def _script(self, attr: str, source: str, keys: list[str], args: list) -> object:
        sha = getattr(self, attr)
        if sha is None:
            sha = await self.redis.script_load(source)
            setattr(self, attr, sha)
        try:
            return await self.redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or was flushed: the script cache is empty.
            sha = await self.redis.script_load(source)
            setattr(self, attr, sha)
            return await self.redis.evalsha(sha, len(keys), *keys, *args)

    async def load(self, name: str) -> Loaded:
        """Snapshot and the log after it, in one atomic read."""
        k = self.keys
        # Our own appends in flight now may land after the script ran and
        # leave the queue before the caller looks (the reader skips our own
        # entries): they come with the result.
        ours = self.pending_updates(name)
        self._unregister.discard(name)
        while name in self._unregistering:
            await asyncio.sleep(0.005)  # a removal on its way must not land after this registration
        reply = await self._script("_load_sha", LOAD_SCRIPT,
                                   [self.inbox, k.members(name), k.snap(name), k.log(name)],
                                   [self._instance_b, self.member_ttl_ms, self.inbox_ttl_ms])
        loaded = parse_loaded(reply)
        loaded.updates += ours
        self.metrics.documents_loaded.inc()
        return loaded

    async def compact_to(self, name: str, state: bytes, covers: str) -> bool:
        """Make `state` the snapshot covering the log up to `covers`, unless
        the snapshot already covers that far."""
        k = self.keys
        written = await self._script(
            "_compact_sha", COMPACT_SCRIPT, [k.snap(name), k.log(name)], [state, covers, self.ttl_ms]
        )
        return bool(written)

    # ------------------------------------------------------------ tracking

    def track(self, name: str, loaded: Loaded | None) -> None:
        """`name` is open here; read its log after `loaded.cursor`, or load
        it first when it could not be loaded (None)."""
        self._tracked[name] = _Tracked(None if loaded is None else loaded.cursor)
        self._unsettled.add(name)
        self._set_changed()

    def untrack(self, name: str) -> None:
        self._appended.pop(name, None)
        self._unsettled.discard(name)
        if self._tracked.pop(name, None) is not None:
            self._set_changed()
            # No more of its updates to this inbox (left to expire if Redis is down).
            self._unregister.add(name)
            self._idle.clear()
            self._wake.set()

    def leave_all(self) -> None:
        """Shutting down: remove this instance from every open document's
        members (with the next append pipeline; `flush` waits for it)."""
        self._unregister.update(self._tracked)
        self._idle.clear()
        self._wake.set()

    def cursor(self, name: str) -> str | None:
        t = self._tracked.get(name)
        return None if t is None or t.needs_load else t.cursor

    def pending_updates(self, name: str) -> list[bytes]:
        """Updates for `name` still waiting to be appended (a reload must
        not lose them: the reader skips this instance's own entries)."""
        if not self._unacked_by_doc.get(name):
            return []
        return [a.update for a in self._queue if a.name == name and a.update]

    def _set_changed(self) -> None:
        self._changed.set()
        if self._reading and self._reader_id is not None and not self._unblock_sent:
            self._unblock_sent = True
            spawn(self._unblock(self._reader_id), name="collab-unblock")

    async def _unblock(self, client_id: int) -> None:
        try:
            await self.redis.client_unblock(client_id)
        except (RedisError, OSError) as exc:
            log.debug("could not cut the blocking read short", extra={"error": str(exc)})

    # -------------------------------------------------------------- append

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
        self._idle.clear()
        self._wake.set()

    def publish_awareness(self, name: str, update: bytes, kind: bytes = b"a") -> None:
        if len(self._aw_queue) >= MAX_QUEUED_AWARENESS:
            self._aw_queue.popleft()
        self._aw_queue.append((name, kind, update))
        self._idle.clear()
        self._wake.set()

    async def _append_loop(self) -> None:
        attempt = 0
        while True:
            if not self._queue and not self._aw_queue and not self._unregister:
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
            aw = list(itertools.islice(self._aw_queue, APPEND_BATCH))
            leaving = list(itertools.islice(self._unregister, APPEND_BATCH))
            self._unregister.difference_update(leaving)
            self._unregistering.update(leaving)
            try:
                await self._write(batch, aw, leaving)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                _raise_if_cancelled()
                # Still to remove, unless opened here again meanwhile.
                self._unregister.update(n for n in leaving if n not in self._tracked)
                self._unregistering.difference_update(leaving)
                self._failed("append", exc)
                self.append_ok = False
                attempt += 1
                await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * (0.5 + random.random() / 2))
                continue
            if not self.append_ok:
                log.info("redis answers again; queued edits appended", extra={"updates": self.unacked_updates})
            attempt = 0
            self.append_ok = True
            self._unregistering.difference_update(leaving)
            for _ in aw:
                self._aw_queue.popleft()
            self._done(batch)

    async def _write(self, batch: list[_Append], aw: list[tuple[str, bytes, bytes]], leaving: list[str]) -> None:
        if self._append_sha is None:
            self._append_sha = await self.redis.script_load(APPEND_SCRIPT)
        if self._awareness_sha is None and aw:
            self._awareness_sha = await self.redis.script_load(AWARENESS_SCRIPT)
        commands: list[bytes] = []
        k = self.keys
        inboxes = k.inbox_prefix()
        now = time.monotonic()
        positions: list[tuple[int, str]] = []
        for entry in batch:
            if entry.update is None:
                continue
            tracked = self._tracked.get(entry.name)
            ttl = 0
            if tracked is None or tracked.ttl_on_append or now - tracked.ttl_refreshed > TTL_REFRESH_SECONDS:
                # A key written here must never outlive the TTL (a crash
                # before the next compaction must not leave it forever).
                ttl = self.ttl_ms
                if tracked is not None:
                    tracked.ttl_refreshed, tracked.ttl_on_append = now, False
            positions.append((len(commands), entry.name))
            commands.append(pack_command(
                "EVALSHA", self._append_sha, 2, k.log(entry.name), k.members(entry.name), self._instance_b,
                entry.update, ttl, self.inbox_maxlen, entry.name, inboxes,
            ))
        for name, kind, update in aw:
            commands.append(pack_command(
                "EVALSHA", self._awareness_sha, 1, k.members(name), self._instance_b, kind, update,
                self.inbox_maxlen, name, inboxes,
            ))
        for name in leaving:
            commands.append(pack_command("ZREM", k.members(name), self._instance_b))
        if commands:
            results = await self._append_line.run(commands)
            for result in results:
                if isinstance(result, NoScriptError):
                    # Redis restarted or was flushed: load them, then retry.
                    self._append_sha = self._awareness_sha = None
                    raise result
                if isinstance(result, RedisError):
                    raise result
            for index, name in positions:
                if name in self._tracked:
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

    # ---------------------------------------------------------- compaction

    def compact(self, name: str, snapshot: Callable[[], bytes | None], lease: bool = True) -> None:
        """Compact `name` in the background. With `lease`, first take the
        document's lease and skip if another instance holds it; `snapshot`
        is called then, with the reader position taken at the same moment.
        Without, the state is taken now (the document is being unloaded)."""
        if lease:
            if name in self._compacting:
                self._again[name] = snapshot  # once this one is done
                return
            spawn(self._compact_leased(name, snapshot), name="collab-compact", tasks=self._compactions)
        else:
            covers = self.cursor(name)
            if covers is None:
                return
            t = self._tracked[name]
            # Whether the reader had applied all its inbox then: if so, and
            # nothing came into the inbox since, the state covers this
            # instance's own appends too.
            seen = self._inbox_cursor if not t.catch_up else None
            appended = self._appended.get(name)
            state = snapshot()
            if state is None:
                return
            spawn(self._compact(name, state, covers, appended, seen), name="collab-compact", tasks=self._compactions)

    async def _compact_leased(self, name: str, snapshot: Callable[[], bytes | None], retry: bool = True) -> None:
        self._compacting.add(name)
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
            covers = self.cursor(name)
            state = snapshot() if covers is not None else None
            if state is None:
                return
            await self._compact(name, state, covers)
            appended = self._appended.get(name)
            if self._unacked_by_doc.get(name) or (appended is not None and parse_id(appended) > parse_id(covers)):
                # Our own later edits are (or will be) in the log only; nothing
                # else would bring them into a snapshot if nobody types again.
                asyncio.get_running_loop().call_later(CATCH_UP_SECONDS, lambda: self._retry(name, snapshot))
        finally:
            self._compacting.discard(name)
            again = self._again.pop(name, None)
            if again is not None and name in self._tracked:
                self.compact(name, again)

    def _retry(self, name: str, snapshot: Callable[[], bytes | None]) -> None:
        if name in self._tracked:
            if name in self._compacting:
                self._again[name] = snapshot
                return
            spawn(self._compact_leased(name, snapshot, retry=False), name="collab-compact", tasks=self._compactions)

    async def _caught_up(self, name: str, timeout: float = CATCH_UP_SECONDS) -> None:
        """Move `name`'s position past this instance's last append, once the
        reader has applied everything the inbox held after it (briefly).

        Our own appends never come back through the inbox; any other
        instance's update before one of them was in the inbox (one script
        wrote both) by the time it was acknowledged, so it is applied once
        the reader has passed the inbox's end as read after the ack."""
        appended, cursor = self._appended.get(name), self.cursor(name)
        if appended is None or cursor is None or parse_id(cursor) >= parse_id(appended):
            return
        try:
            mark = await self._inbox_end(self.redis)
        except (RedisError, OSError) as exc:
            log.debug("inbox position unknown", extra={"error": str(exc)})
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self._tracked.get(name)
            if t is None or t.needs_load:
                return
            if parse_id(t.cursor) >= parse_id(appended):
                return
            passed = self._inbox_cursor
            if not t.catch_up and passed is not None and parse_id(passed) >= parse_id(mark):
                t.cursor = appended
                return
            await asyncio.sleep(0.005)

    async def _compact(self, name: str, state: bytes, covers: str, appended: str | None = None,
                       seen: str | None = None) -> None:
        try:
            # As `_caught_up`, for a document leaving: when nothing arrived
            # unread since, its state holds this instance's appends too.
            if (appended is not None and seen is not None and parse_id(appended) > parse_id(covers)
                    and parse_id(await self._inbox_end(self.redis)) <= parse_id(seen)):
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

    def _draft_count(self) -> int:
        now = time.monotonic()
        if len(self.drafts) > 1000 or random.random() < 0.05:
            for name in [n for n, expiry in self.drafts.items() if expiry < now]:
                del self.drafts[name]
        return sum(1 for expiry in self.drafts.values() if expiry >= now)

    async def refresh_ttls(self) -> None:
        """Keep the keys of documents open here from expiring, however long
        they stay open without an edit."""
        now = time.monotonic()
        due = [n for n, t in self._tracked.items() if now - t.ttl_refreshed > TTL_REFRESH_SECONDS]
        if not due:
            return
        pipe = self.redis.pipeline(transaction=False)
        for name in due:
            pipe.pexpire(self.keys.log(name), self.ttl_ms)
            pipe.pexpire(self.keys.snap(name), self.ttl_ms)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("ttl refresh failed", extra={"error": str(exc)})
            return
        for name in due:
            t = self._tracked.get(name)
            if t is not None:
                t.ttl_refreshed = now

    # ---------------------------------------------------------- membership

    async def _member_loop(self) -> None:
        while True:
            await asyncio.sleep(MEMBER_REFRESH_SECONDS * (0.9 + random.random() / 5))
            try:
                await self.refresh_membership()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.debug("membership refresh failed", extra={"error": str(exc)})

    async def refresh_membership(self) -> None:
        """Renew this instance's registration on every document open here,
        and its inbox's TTL. A registration that had lapsed (a stall longer
        than its TTL) or an inbox gone means updates may have been missed:
        those documents catch up from their logs."""
        names = [n for n, t in self._tracked.items() if not t.needs_load]
        if not names:
            return  # the next load registers again, and creates the inbox
        batches = [names[i:i + REGISTER_BATCH] for i in range(0, len(names), REGISTER_BATCH)]
        if self._register_sha is None:
            self._register_sha = await self.redis.script_load(REGISTER_SCRIPT)
        pipe = self.redis.pipeline(transaction=False)
        for batch in batches:
            keys = [self.inbox, *(self.keys.members(n) for n in batch)]
            pipe.evalsha(self._register_sha, len(keys), *keys, self._instance_b, self.member_ttl_ms,
                         self.inbox_ttl_ms)
        try:
            replies = await pipe.execute()
        except NoScriptError:
            self._register_sha = None
            raise
        missed: list[str] = []
        for batch, alive in zip(batches, replies, strict=True):
            inbox_lost = not alive[0] and self._inbox_cursor is not None
            missed += [n for n, live in zip(batch, alive[1:], strict=False) if inbox_lost or not live]
        for name in missed:
            t = self._tracked.get(name)
            if t is not None:
                t.catch_up = True
                self._unsettled.add(name)
        if missed:
            log.info("registration lapsed or inbox gone; catching up from the logs",
                     extra={"documents": len(missed)})
            self._set_changed()

    # -------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        client = create_redis(self.url, max_connections=1, socket_timeout=READ_BLOCK_MS / 1000 + 10)
        attempt = 0
        try:
            while True:
                _raise_if_cancelled()
                try:
                    await self._read_once(client)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except (RedisError, OSError) as exc:
                    _raise_if_cancelled()
                    self._reading = False
                    self._reader_id = None
                    if self.reader_live:
                        self.reader_live = False
                    self._failed("read", exc)
                    attempt += 1
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * (0.5 + random.random() / 2))
                except Exception:
                    _raise_if_cancelled()
                    # A bug of ours must not stop every document's updates.
                    log.exception("reader failed; restarting it")
                    await asyncio.sleep(1.0)
        finally:
            try:
                # Bounded: closing a connection cancelled mid-read may never end.
                await asyncio.wait_for(client.aclose(), 1.0)
            except (Exception, TimeoutError) as exc:  # noqa: BLE001
                log.debug("closing the reader failed", extra={"error": str(exc)})

    async def _read_once(self, client) -> None:
        if self._reader_id is None:
            self._reader_id = await client.client_id()
            if not self.reader_live:
                self._back_online()
            self.reader_live = True
            if self._inbox_cursor is not None:
                await self._check_inbox_gap(client, self._inbox_cursor)
            if not self._warned:
                self._warned = True
                await self._check_redis_config()
        # Cleared first: a document opened during the catch-ups below is seen
        # (the read is skipped and the loop comes round again).
        self._changed.clear()
        self._unblock_sent = False
        if self._inbox_cursor is None and self._tracked:
            # Before any catch-up: what is appended after it is then after this.
            self._inbox_cursor = await self._inbox_end(client)
        for name in list(self._unsettled):
            t = self._tracked.get(name)
            if t is not None and t.needs_load:
                await self._reload(name)
        for name in list(self._unsettled):
            t = self._tracked.get(name)
            if t is not None and t.catch_up and not t.needs_load:
                await self._catch_up(client, name)
            t = self._tracked.get(name)
            if t is None or not (t.catch_up or t.needs_load):
                self._unsettled.discard(name)
        if not self._tracked:
            # Nothing open here: no need to follow the inbox meanwhile (what
            # is opened next catches up from its log).
            self._inbox_cursor = None
            try:
                # Not wait_for: on 3.11 it can swallow the reader's cancellation.
                async with asyncio.timeout(READ_BLOCK_MS / 1000):
                    await self._changed.wait()
            except TimeoutError:
                await client.ping()
            return
        if self._inbox_cursor is None or self._changed.is_set():
            return  # a document was opened meanwhile: start over
        self._reading = True
        try:
            reply = await client.xread({self.inbox: self._inbox_cursor}, count=READ_COUNT, block=READ_BLOCK_MS)
        finally:
            self._reading = False
        if not reply:
            return
        self.wakeups += 1
        before = self._inbox_cursor
        entries = _stream_entries(reply)
        self._deliver_inbox(entries)
        if len(entries) >= READ_COUNT:
            # Behind: entries after `before` may have gone with the cap.
            await self._check_inbox_gap(client, before)
        now = time.monotonic()
        streaming = now - self._last_wake < READ_STREAMING_SECONDS
        self._last_wake = now
        if streaming:
            await asyncio.sleep(READ_COALESCE_SECONDS)

    async def _inbox_end(self, client) -> str:
        last = await client.xrevrange(self.inbox, count=1)
        return id_text(last[0][0]) if last else ZERO_ID

    async def _check_inbox_gap(self, client, position: str) -> None:
        try:
            info = await client.xinfo_stream(self.inbox)
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return
            raise
        # The cap trims the oldest entries (XINFO's max-deleted-entry-id
        # counts XDEL only): anything after `position` may be gone when the
        # first entry left is past it. Wrongly true at worst costs a catch-up.
        first = info.get("recorded-first-entry-id") or info.get(b"recorded-first-entry-id")
        if first is None:
            entry = info.get("first-entry") or info.get(b"first-entry")
            first = entry[0] if entry else None
        try:
            behind = first is not None and parse_id(id_text(first)) > parse_id(position)
        except ValueError:
            behind = True
        if behind:
            log.info("reader behind its inbox's cap; catching up from the documents' logs")
            for t in self._tracked.values():
                t.catch_up = True
            self._unsettled.update(self._tracked)

    async def _catch_up(self, client, name: str) -> None:
        """Apply `name`'s log after our position (a trim marker there means
        a gap: reload)."""
        while True:
            t = self._tracked.get(name)
            if t is None or t.needs_load:
                return
            entries = await client.xrange(self.keys.log(name), min="(" + t.cursor, max="+", count=READ_COUNT)
            t = self._tracked.get(name)
            if t is None:
                return
            self._deliver_log(name, t, entries, time.time() * 1000)
            if t.needs_load:
                await self._reload(name)
                continue
            if len(entries) < READ_COUNT:
                t.catch_up = False
                return

    def _back_online(self) -> None:
        if not self.ever_failed:
            return
        log.info("redis reader connected again; reloading open documents")
        # Redis may have lost data (no persistence): everything open here is
        # merged back from the log, and compacted, so the snapshot is whole.
        # The reload registers each again (its registration may have lapsed).
        for t in self._tracked.values():
            t.needs_load = True
        self._unsettled.update(self._tracked)

    async def _reload(self, name: str) -> None:
        loaded = await self.load(name)
        t = self._tracked.get(name)
        if t is None:
            return
        if t.gap:
            self.metrics.gap_reloads.inc()
        t.cursor, t.needs_load, t.gap, t.catch_up = loaded.cursor, False, False, True
        if self.listener is not None:
            self.listener.reload(name, loaded)

    def _deliver_inbox(self, entries) -> None:
        now_ms = time.time() * 1000
        lag = self.metrics.receive_lag
        updates: dict[str, list[bytes]] = {}
        listener = self.listener
        for raw_id, raw in entries:
            self._inbox_cursor = entry_id = id_text(raw_id)
            fields = fields_of(raw)
            doc = fields.get(b"d")
            t = self._tracked.get(doc.decode("utf-8", "replace")) if doc else None
            if t is None:
                continue  # left here since, or a hello entry
            name = doc.decode("utf-8", "replace")
            position = fields.get(b"e")
            if position is not None:
                if t.needs_load or t.catch_up:
                    continue  # its log is read first
                try:
                    if parse_id(position) <= parse_id(t.cursor):
                        continue  # delivered twice, or already read from the log
                except ValueError:
                    log.warning("inbox entry with a bad log id skipped", extra={"document": name})
                    continue
                t.cursor = id_text(position)
                if fields.get(b"i") == self._instance_b:
                    continue  # applied here before it was appended
                update = fields.get(b"u")
                if update:
                    updates.setdefault(name, []).append(update)
                    try:
                        lag.observe(max(0.0, now_ms - parse_id(entry_id)[0]) / 1000)
                    except ValueError:
                        pass
            elif fields.get(b"i") == self._instance_b or listener is None:
                continue
            elif b"a" in fields:
                listener.remote_awareness(name, fields[b"a"])
            elif b"q" in fields:
                listener.awareness_query(name)
        if listener is not None:
            for name, batch in updates.items():
                listener.remote_updates(name, batch)

    def _deliver_log(self, name: str, t: _Tracked, entries, now_ms: float) -> None:
        updates: list[bytes] = []
        for raw_id, raw in entries:
            entry_id = id_text(raw_id)
            try:
                position = parse_id(entry_id)
            except ValueError:
                log.warning("stream entry with a bad id skipped", extra={"document": name})
                continue
            if position <= parse_id(t.cursor):
                continue  # delivered twice
            fields = fields_of(raw)
            covered = fields.get(b"t")
            if covered is not None:
                try:
                    behind = _is_before(t.cursor, id_text(covered))
                except ValueError:
                    log.warning("trim marker with a bad id skipped", extra={"document": name})
                    behind = False
                if behind:
                    # Entries between our position and the snapshot were trimmed unread.
                    log.info("reader behind the trimmed history; reloading", extra={"document": name})
                    t.needs_load = t.gap = True
                    self._unsettled.add(name)
                    break
                t.cursor = entry_id
                continue
            t.cursor = entry_id
            if fields.get(b"i") == self._instance_b:
                continue  # applied here before it was appended
            update = fields.get(b"u")
            if update:
                updates.append(update)
                self.metrics.receive_lag.observe(max(0.0, now_ms - position[0]) / 1000)
        if updates and self.listener is not None:
            self.listener.remote_updates(name, updates)


    # ------------------------------------------------------------- startup

    async def _check_redis_config(self) -> None:
        """Warn once when Redis may evict or lose drafts."""
        try:
            memory = await self.redis.info("memory")
            persistence = await self.redis.info("persistence")
        except (RedisError, OSError) as exc:
            log.info("could not read the Redis configuration", extra={"error": str(exc)[:200]})
            return
        policy = str(memory.get("maxmemory_policy", "unknown"))
        aof = str(persistence.get("aof_enabled", "0")) == "1"
        save = ""
        try:
            save = (await self.redis.config_get("save")).get(b"save", b"") or b""
            save = save.decode() if isinstance(save, bytes) else str(save)
        except (RedisError, OSError):
            save = "unknown"
        problems = []
        if policy != "noeviction":
            problems.append(f"maxmemory-policy is {policy}: Redis may evict drafts (volatile-* policies too)")
        if not aof and not save.strip():
            problems.append("no persistence (appendonly no, no save points): a Redis restart loses drafts")
        if problems:
            log.warning(
                "redis can lose collab drafts: " + "; ".join(problems)
                + ". Give collab a Redis of its own with appendonly yes and maxmemory-policy noeviction"
                " (acknowledged edits are only as durable as that Redis).",
                extra={"maxmemory_policy": policy, "appendonly": aof},
            )


def _raise_if_cancelled() -> None:
    """The redis client may turn a cancellation caught mid-read into a
    connection error; a task being cancelled must still end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stream_entries(reply) -> list:
    """The entries of a one-stream XREAD reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        for entries in reply.values():
            return entries[0] if entries and isinstance(entries[0], list) and entries[0] \
                and isinstance(entries[0][0], list) else entries
        return []
    return reply[0][1] if reply else []
