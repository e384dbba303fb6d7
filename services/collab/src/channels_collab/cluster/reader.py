"""The inbox reader: one task, one connection of its own, XREAD BLOCK of
this instance's inbox; before each read it loads and catches up the
documents `Positions` marks unsettled, and it checks for gaps in the inbox.

It wakes only for other instances' updates of documents open here: an
instance alone on a document (the single-instance default) never reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from channels_common.redis import create_redis
from channels_common.tasks import spawn
from redis.exceptions import RedisError

from ..snapshot import ZERO_ID, Keys, Loaded, id_text, parse_id
from .health import Health, backoff, raise_if_cancelled
from .positions import Listener, Positions

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


async def inbox_end(client, inbox: str) -> str:
    """Id of the last entry of `inbox` (ZERO_ID when there is none)."""
    last = await client.xrevrange(inbox, count=1)
    return id_text(last[0][0]) if last else ZERO_ID


class InboxReader:
    def __init__(self, url: str, redis, keys: Keys, inbox: str, positions: Positions, health: Health,
                 load: Callable[[str], Awaitable[Loaded]]):
        self.url = url
        self.redis = redis
        self.keys = keys
        self.inbox = inbox
        self.positions = positions
        self.health = health
        self._load = load
        self.listener: Listener | None = None
        # Reads of the inbox that returned entries.
        self.wakeups = 0
        self._last_wake = 0.0
        self._changed = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False
        self._unblock_sent = False

    def changed(self) -> None:
        """Documents to settle: cut a blocking read short."""
        self._changed.set()
        if self._reading and self._reader_id is not None and not self._unblock_sent:
            self._unblock_sent = True
            spawn(self._unblock(self._reader_id), name="collab-unblock")

    async def _unblock(self, client_id: int) -> None:
        try:
            await self.redis.client_unblock(client_id)
        except (RedisError, OSError) as exc:
            log.debug("could not cut the blocking read short", extra={"error": str(exc)})

    async def run(self) -> None:
        client = create_redis(self.url, max_connections=1, socket_timeout=READ_BLOCK_MS / 1000 + 10)
        attempt = 0
        try:
            while True:
                raise_if_cancelled()
                try:
                    await self.read_once(client)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except (RedisError, OSError) as exc:
                    raise_if_cancelled()
                    self._reading = False
                    self._reader_id = None
                    self.health.reader_live = False
                    self.health.failed("read", exc)
                    attempt += 1
                    await asyncio.sleep(backoff(attempt))
                except Exception:
                    raise_if_cancelled()
                    # A bug of ours must not stop every document's updates.
                    log.exception("reader failed; restarting it")
                    await asyncio.sleep(1.0)
        finally:
            try:
                # Bounded: closing a connection cancelled mid-read may never end.
                await asyncio.wait_for(client.aclose(), 1.0)
            except (Exception, TimeoutError) as exc:  # noqa: BLE001
                log.debug("closing the reader failed", extra={"error": str(exc)})

    async def read_once(self, client) -> None:
        positions = self.positions
        if self._reader_id is None:
            self._reader_id = await client.client_id()
            if not self.health.reader_live:
                self._back_online()
            self.health.reader_live = True
            if positions.inbox_cursor is not None:
                await self._check_inbox_gap(client, positions.inbox_cursor)
            await self.health.check_config_once()
        # Cleared first: a document opened during the catch-ups below is seen
        # (the read is skipped and the loop comes round again).
        self._changed.clear()
        self._unblock_sent = False
        tracked = positions.tracked
        if positions.inbox_cursor is None and tracked:
            # Before any catch-up: what is appended after it is then after this.
            positions.inbox_cursor = await inbox_end(client, self.inbox)
        for name in list(positions.unsettled):
            t = tracked.get(name)
            if t is not None and t.needs_load:
                await self.reload(name)
        for name in list(positions.unsettled):
            t = tracked.get(name)
            if t is not None and t.catch_up and not t.needs_load:
                await self._catch_up(client, name)
            t = tracked.get(name)
            if t is None or not (t.catch_up or t.needs_load):
                positions.unsettled.discard(name)
        if not tracked:
            # Nothing open here: no need to follow the inbox meanwhile (what
            # is opened next catches up from its log).
            positions.inbox_cursor = None
            try:
                # Not wait_for: on 3.11 it can swallow the reader's cancellation.
                async with asyncio.timeout(READ_BLOCK_MS / 1000):
                    await self._changed.wait()
            except TimeoutError:
                await client.ping()
            return
        if positions.inbox_cursor is None or self._changed.is_set():
            return  # a document was opened meanwhile: start over
        self._reading = True
        try:
            reply = await client.xread({self.inbox: positions.inbox_cursor}, count=READ_COUNT, block=READ_BLOCK_MS)
        finally:
            self._reading = False
        if not reply:
            return
        self.wakeups += 1
        before = positions.inbox_cursor
        entries = stream_entries(reply)
        positions.deliver_inbox(entries, self.listener)
        if len(entries) >= READ_COUNT:
            # Behind: entries after `before` may have gone with the cap.
            await self._check_inbox_gap(client, before)
        now = time.monotonic()
        streaming = now - self._last_wake < READ_STREAMING_SECONDS
        self._last_wake = now
        if streaming:
            await asyncio.sleep(READ_COALESCE_SECONDS)

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
            self.positions.catch_up(list(self.positions.tracked))

    async def _catch_up(self, client, name: str) -> None:
        """Apply `name`'s log after our position (a trim marker there means
        a gap: reload)."""
        tracked = self.positions.tracked
        while True:
            t = tracked.get(name)
            if t is None or t.needs_load:
                return
            entries = await client.xrange(self.keys.log(name), min="(" + t.cursor, max="+", count=READ_COUNT)
            t = tracked.get(name)
            if t is None:
                return
            self.positions.deliver_log(name, entries, self.listener)
            if t.needs_load:
                await self.reload(name)
                continue
            if len(entries) < READ_COUNT:
                t.catch_up = False
                return

    def _back_online(self) -> None:
        if not self.health.ever_failed:
            return
        log.info("redis reader connected again; reloading open documents")
        # Redis may have lost data (no persistence): everything open here is
        # merged back from the log, and compacted, so the snapshot is whole.
        # The reload registers each again (its registration may have lapsed).
        self.positions.reload_all()

    async def reload(self, name: str) -> None:
        loaded = await self._load(name)
        if self.positions.reloaded(name, loaded) and self.listener is not None:
            self.listener.reload(name, loaded)


def stream_entries(reply) -> list:
    """The entries of a one-stream XREAD reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        for entries in reply.values():
            return entries[0] if entries and isinstance(entries[0], list) and entries[0] \
                and isinstance(entries[0][0], list) else entries
        return []
    return reply[0][1] if reply else []
