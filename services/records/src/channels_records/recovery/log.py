"""The recovery log: every relayed message appended to its room's stream
with an offset that is the same on every instance (see the package
docstring for dedup), in pipelined batches on a line of its own
(channels_common.redis_line): calls made while an exchange is in flight go
together in the next one, in call order."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from channels_common.redis_line import RedisLine
from channels_common.resp import pack_command
from channels_common.tasks import spawn
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .keys import Keys
from .scripts import LOG, Script

# Log calls sent in one pipeline at most: bounds the reply buffer and lets
# results reach callers in steady steps during a burst.
MAX_BATCH = 500
# A log call or batch that Redis has not answered in this time drops its connection.
LINE_TIMEOUT_SECONDS = 5.0
# Occurrences of one payload whose offsets the dedup hash keeps.
DEDUP_KEEP = 64
# mark_live's retries of the Redis clock: the longest pause between two.
MARK_RETRY_MAX_SECONDS = 2.0

log = logging.getLogger("channels.records.recovery")


class EventLog:
    """`instance_id` must differ between processes running at the same time
    (e.g. hostname + process id); restarts are told apart by start time.
    `start_grace_ms`: occurrences logged this long before the instance
    started listening count as not seen by it (clock skew, and the time
    between subscribing and the first call). `clock` (milliseconds)
    replaces the Redis clock in ids and trimming, for tests."""

    def __init__(
        self,
        redis,
        keys: Keys,
        *,
        window_ms: int,
        instance_id: str,
        dedup_ms: int = 10_000,
        max_events_per_room: int = 1000,
        log_timeout_seconds: float | None = 2.0,
        max_pending: int = 10_000,
        start_grace_ms: int = 1000,
        clock: Callable[[], int] | None = None,
    ):
        self._redis = redis
        self.keys = keys
        self.window_ms = window_ms
        self.instance_id = instance_id
        self.dedup_ms = max(1, dedup_ms)
        self.max_events_per_room = max_events_per_room
        self.log_timeout = log_timeout_seconds
        self.max_pending = max_pending
        self.start_grace_ms = start_grace_ms
        self._clock = clock
        self._log = Script(LOG)
        self._line = RedisLine(redis, LINE_TIMEOUT_SECONDS)
        # The local wall clock until mark_live() reads Redis's; the grace
        # absorbs skew between the two.
        self._start_ms = self._now_local() - start_grace_ms
        self._marks = 0  # start marks set so far: a newer one supersedes a mark_live still retrying
        self.epoch: int | None = None  # see set_epoch
        self._serial = 0
        self._pending: list[_Queued] = []  # in call order
        self._pending_calls = 0
        self._flusher: asyncio.Task | None = None
        self._busy = False  # a log call or batch is in flight

    def _now_local(self) -> int:
        return int(self._clock()) if self._clock else int(time.time() * 1000)

    def _me(self) -> str:
        return f"{self.instance_id}:{self._start_ms}"

    def set_epoch(self, epoch: int | None) -> None:
        """The subscription epoch of the messages logged from now on: the
        number of the last marker (channels_common.redis.Subscription
        epoch_channel) before them in the pub/sub order, None for none.
        Every instance that sees a message of an epoch has seen every
        message of that epoch before it, so within one epoch each
        instance's occurrence count is exact from zero: no start time and
        no guess."""
        self.epoch = epoch

    def listening_since(self, at_ms: int) -> None:
        """Call when the pub/sub subscription (re)becomes live, with the
        Redis clock read just before its SUBSCRIBE took effect (see
        channels_common.redis.Subscription.read_clock), before it hands over
        any message: a fresh occurrence count from then, with no grace, so
        that an occurrence logged earlier (published while this instance was
        not listening) is never taken for one it is about to see."""
        self._marks += 1
        self._start_ms = int(at_ms)

    async def mark_live(self) -> None:
        """Call when the pub/sub subscription (re)becomes live: messages
        published while it was down were not seen, so this instance starts a
        fresh occurrence count from now (Redis clock) less the start grace.
        Occurrences logged within the grace before it started listening are
        taken for ones it will see: prefer `listening_since`. Until Redis
        tells its time (a stale pooled connection after a restart, Redis
        still loading), the mark is the local clock's, and the clock is
        asked again with backoff, a warning line per failure; a newer mark
        (another call, `listening_since`) ends the retries. Never raises a
        Redis error."""
        self._marks += 1
        mine = self._marks
        self._start_ms = self._now_local() - self.start_grace_ms
        if self._clock:
            return
        attempt = 0
        while True:
            try:
                seconds, micros = await self._redis.time()
                break
            except (RedisError, OSError) as exc:
                attempt += 1
                log.warning(
                    "recovery start mark: redis clock unavailable, retrying",
                    extra={"error": type(exc).__name__, "attempt": attempt},
                )
                delay = min(MARK_RETRY_MAX_SECONDS, 0.05 * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                if mine != self._marks:
                    return
        if mine == self._marks:
            self._start_ms = int(seconds) * 1000 + int(micros) // 1000 - self.start_grace_ms

    def log_batch(
        self,
        messages: list[tuple[str, str, bytes]],
        on_done: Callable[[list | None, BaseException | None], None],
    ) -> None:
        """Log relayed messages, in order, in one round trip (every
        instance logs every message and gets the same offsets), for the
        relay's hot path (no task per batch): `on_done(results, None)` with
        an offset or a Redis error per message, or `on_done(None, error)`
        when Redis cannot answer within the log timeout. Called exactly
        once, possibly before this returns."""
        if self._pending_calls + len(messages) > self.max_pending:
            on_done(None, RedisTimeoutError("recovery log backlog is full"))
            return
        calls = []
        k = self.keys
        epoch = self.epoch
        start = self._start_ms if epoch is None else -1
        for room, event, data in messages:
            self._serial += 1
            keys = [k.last, k.room(room), k.dedup(room, event, data, epoch), k.trim(room)]
            args = [
                self._me(), start, self._serial, event, data, self.window_ms, self.dedup_ms,
                "" if self._clock is None else self._now_local(), DEDUP_KEEP, self.max_events_per_room,
            ]
            calls.append((keys, args))
        if not self._busy and not self._pending and self._line.ready:
            # Nothing in flight and a connection at hand: one exchange,
            # answered in the connection's read callback.
            self._busy = True
            self._line.start(
                self._packed(calls), self.log_timeout, lambda replies, error: self._direct_done(calls, on_done, replies, error)
            )
            return
        self._queue(_Queued(calls, on_done))

    def _direct_done(self, calls, on_done, replies, error) -> None:
        self._busy = False
        if error is None and any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its scripts (restart, SCRIPT FLUSH): the flusher
            # loads them and sends these calls again, ahead of the rest.
            self._queue(_Queued(calls, on_done), first=True)
            return
        if self._pending:
            self._start_flusher()
        if error is not None:
            on_done(None, error)
        else:
            on_done(self._results(replies), None)

    def _queue(self, entry: _Queued, first: bool = False) -> None:
        # Queued in call order, sent in that order after the exchange in
        # flight: offsets follow call order. The caller hears back within
        # the log timeout even if the calls are still queued; they are
        # still sent, so that every instance's occurrence count stays
        # aligned with the others'.
        if first:
            self._pending.insert(0, entry)
        else:
            self._pending.append(entry)
        self._pending_calls += len(entry.calls)
        if self.log_timeout is not None:
            entry.timer = asyncio.get_running_loop().call_later(self.log_timeout, entry.expire)
        if not self._busy:
            self._start_flusher()

    @staticmethod
    def _results(replies: list) -> list[str | Exception]:
        return [
            reply.decode() if type(reply) is bytes
            else reply if isinstance(reply, BaseException)
            else ResponseError(f"recovery log: unexpected {type(reply).__name__} reply from redis")
            for reply in replies
        ]

    def _start_flusher(self) -> None:
        self._busy = True
        self._flusher = spawn(self._flush(), name="recovery-log-flush")

    async def _flush(self) -> None:
        try:
            while self._pending:
                # Whole callers' batches, up to MAX_BATCH calls (at least one batch).
                taken, calls = 0, []
                while taken < len(self._pending) and (
                    not calls or len(calls) + len(self._pending[taken].calls) <= MAX_BATCH
                ):
                    calls += self._pending[taken].calls
                    taken += 1
                entries, self._pending = self._pending[:taken], self._pending[taken:]
                self._pending_calls -= len(calls)
                try:
                    results, error = await self._send(calls), None
                except Exception as exc:  # noqa: BLE001 - Redis down or worse: every waiter must hear of it
                    results, error = None, exc
                start = 0
                for entry in entries:
                    end = start + len(entry.calls)
                    if error is not None:
                        entry.answer(None, error)
                    else:
                        entry.answer(self._results(results[start:end]), None)
                    start = end
        finally:
            self._busy = False

    async def _send(self, calls: list[tuple[list, list]], timeout: float | None = None) -> list:
        """Replies (or errors) of log calls, in order. `timeout` bounds each
        round trip (the line's own if None)."""
        results = await self._line.run(self._packed(calls), timeout)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis lost its scripts (restart, SCRIPT FLUSH); the calls that
            # did run are not run twice (the serial in ARGV makes them idempotent).
            await self._log.load(self._redis)
            results = await self._line.run(self._packed(calls), timeout)
        return results

    def _packed(self, calls: list[tuple[list, list]]) -> list[bytes]:
        sha = self._log.sha
        return [pack_command("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]


class _Queued:
    """Log calls waiting for the exchange in flight, and who to tell."""

    __slots__ = ("calls", "on_done", "timer")

    def __init__(self, calls: list, on_done: Callable[[list | None, BaseException | None], None]):
        self.calls = calls
        self.on_done = on_done
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, results: list | None, error: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(results, error)

    def expire(self) -> None:
        self.timer = None
        self.answer(None, RedisTimeoutError("recovery log timed out"))
