"""Delivery: one ordered queue per room, claims that let several instances
share the rooms, a global bound on concurrent sends, and the retry policy.

Every instance keeps every message it hears, in its room's queue, until it
sees the message done (or a keep bound drops it). A room's messages are
posted by the one instance that holds the room's claim (claims.py), in the
order of their numbers in the room, each finished (delivered or given up)
before the next starts; the others poll the room's done mark and drop their
copies, and take the room over when its claim lapses. An attempt runs only
while the claim's lease is known to be held: it is cut off before the lease
could have expired, so a room never has two instances posting at once.

Different rooms and bots proceed concurrently, but never more than
`max_concurrent` requests to homeservers at once, and never more than
`max_per_server` to one homeserver, so a slow homeserver can neither tie up
the process nor starve the others. Waiting out a backoff does not hold a
slot. Queues exist only while they hold messages; what they hold is bounded
in count, bytes and age.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from channels_common.tasks import spawn

from .claims import BUSY, EPOCH, OWNER, STALE, UNAVAILABLE, LocalClaims, room_id
from .errors import Permanent, RateLimited, Transient
from .messages import Command
from .metrics import BotsMetrics

log = logging.getLogger("channels.bots.dispatcher")


class Transport(Protocol):
    def lease(self, command: Command) -> AbstractAsyncContextManager[Any]: ...

    async def deliver(self, client: Any, command: Command) -> str: ...


@dataclass(frozen=True)
class RetryPolicy:
    # Attempts in all for network errors and 5xx before giving up.
    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    # 429s are waited out as the homeserver asks, within these bounds.
    max_rate_limited: int = 100
    max_rate_limit_wait: float = 60.0

    def backoff(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Exponential in the number of failures so far, with jitter so that
        many clients failing together do not retry together."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return ceiling * (0.5 + rng() / 2)


@dataclass(eq=False)
class Held:
    """One message kept by this instance; (epoch, seq) once registered."""

    command: Command
    size: int
    heard_at: float
    new: bool = True  # not yet counted in Redis as heard by this instance
    epoch: str | None = None
    seq: int = 0
    started: bool = False


class Room:
    """The messages of one (homeserver, room) this instance keeps, in the
    order it heard them."""

    def __init__(self, key: tuple[str, str]):
        self.key = key
        self.id = room_id(*key)
        self.messages: list[Held] = []
        self.wake = asyncio.Event()
        # Set while every message kept here is numbered.
        self.registered = asyncio.Event()
        self.state = "new"

    @property
    def unregistered(self) -> bool:
        return any(h.epoch is None for h in self.messages)

    def head(self) -> Held | None:
        registered = [h for h in self.messages if h.epoch is not None]
        return min(registered, key=lambda h: h.seq) if registered else None


@dataclass
class Lease:
    epoch: str
    done: int
    deadline: float
    taken_over: bool = False
    lost: bool = False


class LeaseLost(Exception):
    pass


_EMPTY: dict = {}


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        *,
        claims=None,
        policy: RetryPolicy = RetryPolicy(),
        max_concurrent: int = 20,
        max_per_server: int = 10,
        max_pending: int = 10000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_pending_age: float = 3600.0,
        settle: float = 0.0,
        metrics: BotsMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.transport = transport
        self.claims = claims if claims is not None else LocalClaims()
        self.policy = policy
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_age = max_pending_age
        self.settle = settle
        self.metrics = metrics
        self._sleep = sleep
        self._clock = clock
        lease = self.claims.lease
        self.lease = lease
        # Non-owners look at a room's claim this often; an attempt stops this
        # long before the lease could lapse (Redis measures from later).
        self.poll = lease / 4
        self.margin = lease / 5
        # Messages heard before this moment wait for it before being numbered.
        self.settle_until = 0.0
        self._slots = asyncio.Semaphore(max_concurrent)
        self.max_per_server = max_per_server
        # Per homeserver: its semaphore and how many workers use it, so the
        # entry goes away with the last one.
        self._server_slots: dict[str, list] = {}
        self._rooms: dict[tuple[str, str], Room] = {}
        self._workers: dict[tuple[str, str], asyncio.Task] = {}
        # Rooms with messages to number, in the order they got them; one task
        # numbers them as soon as they are heard, whatever the rooms' workers do.
        self._to_register: dict[tuple[str, str], Room] = {}
        self._registrar: asyncio.Task | None = None
        self._pending = 0
        self._pending_bytes = 0
        self._closing = False

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def accepting(self) -> bool:
        return not self._closing

    def oldest_age(self) -> float:
        oldest = min((h.heard_at for room in self._rooms.values() for h in room.messages[:1]), default=None)
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def settled_from(self, when: float | None = None) -> None:
        """The subscription (re)started: what it hears now is numbered only
        after `settle` seconds, so that instances which heard the room's
        earlier messages have numbered those first."""
        self.settle_until = (self._clock() if when is None else when) + self.settle

    def submit(self, command: Command, size: int | None = None) -> bool:
        """Keep a command behind the others for its room; False if refused."""
        if size is None:
            size = len(str(command.content))
        if self._closing:
            self._failed(command, "shutting_down", "received during shutdown")
            return False
        if self._pending >= self.max_pending:
            self._give_up(command, "count", f"{self._pending} messages already kept")
            return False
        if self._pending_bytes + size > self.max_pending_bytes:
            self._give_up(command, "bytes", f"{self._pending_bytes} bytes already kept")
            return False
        key = command.queue_key
        room = self._rooms.get(key)
        if room is None:
            room = self._rooms[key] = Room(key)
        room.messages.append(Held(command, size, self._clock()))
        self._set_pending(self._pending + 1, self._pending_bytes + size)
        self._needs_numbers(room)
        room.wake.set()
        if key not in self._workers:
            self._workers[key] = spawn(self._run_room(room), name="bots-room")
        return True

    def expire(self) -> int:
        """Drop the messages kept longer than `max_pending_age` (except one
        being posted right now). Returns how many."""
        cutoff = self._clock() - self.max_pending_age
        dropped = 0
        for room in list(self._rooms.values()):
            for held in [h for h in room.messages if h.heard_at < cutoff and not h.started]:
                self._forget(room, held)
                self._give_up(held.command, "age", "kept longer than the age bound")
                dropped += 1
        return dropped

    async def close(self, timeout: float) -> int:
        """Stop taking messages, give the rooms this instance posts to
        `timeout` seconds, then abandon the rest (copies kept for rooms that
        another instance posts to are simply dropped). Returns how many
        messages this instance abandoned."""
        self._closing = True
        for room in self._rooms.values():
            room.wake.set()
        workers = list(self._workers.values())
        if workers:
            await asyncio.wait(workers, timeout=timeout)
        for task in list(self._workers.values()):
            task.cancel()
        if self._registrar is not None:
            self._registrar.cancel()
        for task in list(self._workers.values()):
            # the worker handles its own errors; cancellation is all that is left.
            with contextlib.suppress(asyncio.CancelledError):
                await task
        abandoned = sum(len(r.messages) for r in self._rooms.values() if r.state != BUSY)
        others = sum(len(r.messages) for r in self._rooms.values() if r.state == BUSY)
        if abandoned:
            log.warning("shutdown: messages not delivered", extra={"count": abandoned})
            if self.metrics:
                self.metrics.given_up.labels("shutdown").inc(abandoned)
        if others:
            log.info("shutdown: copies dropped, another instance posts them", extra={"count": others})
        self._rooms.clear()
        self._workers.clear()
        self._to_register.clear()
        self._set_pending(0, 0)
        return abandoned

    # -- a room's worker -----------------------------------------------------------

    async def _run_room(self, room: Room) -> None:
        failures = 0
        try:
            while room.messages:
                await self._numbered(room, self.lease)
                head = room.head()
                if head is None:
                    continue
                try:
                    asked = self._clock()
                    grant = await self.claims.take(room.id, head.epoch, head.seq)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except UNAVAILABLE as exc:  # Redis away: keep everything, try again
                    failures += 1
                    log.warning("claims unavailable, retrying", extra={"error": str(exc) or type(exc).__name__})
                    await asyncio.sleep(min(self.lease, 0.05 * 2 ** min(failures, 8)) * (0.5 + random.random() / 2))
                    continue
                if grant.status == EPOCH:
                    # The room's state in Redis is gone (evicted, Redis restarted):
                    # number everything again, in the order heard.
                    for held in room.messages:
                        held.epoch = None
                    self._needs_numbers(room)
                    continue
                self._drop_done(room, grant.epoch, grant.done)
                if grant.status == STALE:
                    continue
                if grant.status != OWNER:
                    room.state = grant.status
                    if self._closing:
                        return
                    room.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(room.wake.wait(), self.poll)
                    continue
                room.state = OWNER
                if grant.skipped:
                    log.warning("messages lost: no instance holds them", extra={
                        "room": room.key[1], "server": room.key[0], "count": grant.skipped})
                    if self.metrics:
                        self.metrics.given_up.labels("lost").inc(grant.skipped)
                lease = Lease(grant.epoch, grant.done, asked + self.lease, taken_over=grant.taken_over)
                try:
                    await self._own(room, lease)
                except asyncio.CancelledError:
                    raise
                except UNAVAILABLE as exc:
                    failures += 1
                    log.warning("claims unavailable, retrying", extra={"error": str(exc) or type(exc).__name__})
                    await asyncio.sleep(min(self.lease, 0.05 * 2 ** min(failures, 8)))
                if self._closing and room.state != OWNER:
                    return
        finally:
            # No await between the emptiness check and removal: a submit
            # either lands in this room before or starts a new worker after.
            if self._workers.get(room.key) is asyncio.current_task():
                del self._workers[room.key]
                if not room.messages:
                    self._rooms.pop(room.key, None)

    def _needs_numbers(self, room: Room) -> None:
        room.registered.clear()
        self._to_register[room.key] = room
        if self._registrar is None:
            self._registrar = spawn(self._register_all(), name="bots-registrar")

    async def _numbered(self, room: Room, timeout: float) -> None:
        """Wait (at most `timeout`) until every message kept is numbered."""
        if room.unregistered:
            self._needs_numbers(room)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.registered.wait(), timeout)

    async def _register_all(self) -> None:
        failures = 0
        try:
            while self._to_register:
                key, room = next(iter(self._to_register.items()))
                try:
                    await self._register(room)
                    failures = 0
                except UNAVAILABLE as exc:
                    failures += 1
                    log.warning("numbering failed, retrying", extra={"error": str(exc) or type(exc).__name__})
                    await asyncio.sleep(min(0.5, 0.02 * 2 ** min(failures, 8)))
                    continue
                if not room.unregistered:
                    self._to_register.pop(key, None)
                    room.registered.set()
        finally:
            self._registrar = None

    async def _register(self, room: Room) -> None:
        """Number, in the order heard, the messages not numbered yet (only
        the registrar calls this: one numbering of a room at a time)."""
        if not room.unregistered:
            return
        wait = self.settle_until - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        todo = [h for h in room.messages if h.epoch is None]
        if not todo:
            return
        expect = next((h.epoch for h in room.messages if h.epoch is not None), None)
        floor = max((h.seq for h in room.messages if h.epoch is not None and h.epoch == expect), default=0)
        places = await self.claims.register(room.id, [(h.command.txn_id, h.new) for h in todo], expect, floor)
        if places is None:
            # The room's state is gone (evicted, Redis restarted): number
            # everything kept again, in the order heard.
            for held in room.messages:
                held.epoch = None
            todo = list(room.messages)
            places = await self.claims.register(room.id, [(h.command.txn_id, h.new) for h in todo])
            if places is None:
                return
        for held, place in zip(todo, places, strict=True):
            if held not in room.messages:
                continue
            held.new = False
            if place.repeat:
                # This instance heard the same publish before, within the window.
                self._forget(room, held)
                if self.metrics:
                    self.metrics.deduplicated.inc()
                continue
            held.epoch, held.seq = place.epoch, place.seq
            if place.seq <= place.done:
                self._forget(room, held)

    def _drop_done(self, room: Room, epoch: str | None, done: int) -> None:
        for held in [h for h in room.messages if h.epoch == epoch and h.seq <= done]:
            self._forget(room, held)

    async def _own(self, room: Room, lease: Lease) -> None:
        """Post the room's messages in order while the claim holds."""
        renewer = spawn(self._renew(room, lease), name="bots-claim-renewal")
        try:
            while room.messages:
                await self._numbered(room, self.lease)
                head = room.head()
                if head is None or head.epoch != lease.epoch:
                    return
                if head.seq <= lease.done:
                    self._forget(room, head)
                    continue
                if head.seq != lease.done + 1:
                    return  # the next one is not here: let whoever holds it claim the room
                if not head.started:
                    head.started = True
                    if self.metrics:
                        self.metrics.claimed.inc()
                        if lease.taken_over:
                            self.metrics.taken_over.inc()
                if not await self._deliver(head.command, lease):
                    lease.lost = True
                    return
                if not await self.claims.finish(room.id, lease.epoch, head.seq):
                    lease.lost = True
                    return
                lease.done = head.seq
                if head in room.messages:
                    self._forget(room, head)
        finally:
            renewer.cancel()
            if lease.lost:
                room.state = "lost"
            else:
                room.state = "released"
                with contextlib.suppress(*UNAVAILABLE):
                    async with asyncio.timeout(self.margin):
                        await self.claims.release(room.id, lease.epoch)

    async def _renew(self, room: Room, lease: Lease) -> None:
        while not lease.lost:
            await asyncio.sleep(self.lease / 3)
            asked = self._clock()
            try:
                held = await self.claims.renew(room.id, lease.epoch)
            except UNAVAILABLE as exc:  # the attempt stops at the deadline unless a renewal gets through
                log.warning("claim renewal failed", extra={"error": str(exc) or type(exc).__name__})
                continue
            if not held:
                lease.lost = True
                return
            lease.deadline = asked + self.lease

    def _held(self, lease: Lease) -> bool:
        return not lease.lost and lease.deadline - self.margin > self._clock()

    async def _guarded(self, lease: Lease, attempt: Awaitable):
        """`attempt`, cancelled once the lease can no longer be known to hold."""
        task = asyncio.ensure_future(attempt)
        try:
            while True:
                remaining = lease.deadline - self.margin - self._clock()
                if lease.lost or remaining <= 0:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    raise LeaseLost()
                done, _ = await asyncio.wait({task}, timeout=min(remaining, self.lease / 10))
                if done:
                    return task.result()
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _deliver(self, command: Command, lease: Lease) -> bool:
        """True once the command is finished (posted, or given up on); False
        when the claim was lost first (the next owner posts it)."""
        policy = self.policy
        failures = 0
        rate_limited = 0
        async with self.transport.lease(command) as client:
            while True:
                if not self._held(lease):
                    return False
                try:
                    async with self._server_slot(command.bot.server), self._slots:
                        await self._guarded(lease, self.transport.deliver(client, command))
                except LeaseLost:
                    return False
                except Permanent as error:
                    self._failed(command, error.reason, error.detail)
                    return True
                except RateLimited as error:
                    rate_limited += 1
                    if rate_limited > policy.max_rate_limited:
                        self._failed(command, "gave_up", f"rate limited {rate_limited} times")
                        return True
                    self._count_retry("rate_limited")
                    await self._sleep(min(error.retry_after, policy.max_rate_limit_wait))
                    continue
                except Transient as error:
                    failures += 1
                    if failures >= policy.max_attempts:
                        self._failed(command, "gave_up", f"{failures} attempts, last {error}")
                        return True
                    self._count_retry(error.reason)
                    delay = policy.backoff(failures)
                    log.info(
                        "delivery failed, retrying",
                        extra={**_where(command), "error": str(error), "attempt": failures, "delay": round(delay, 3)},
                    )
                    await self._sleep(delay)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug must cost one message, not the room's queue.
                    log.exception("delivery crashed", extra=_where(command))
                    self._count_failed("internal")
                    return True
                if self.metrics:
                    self.metrics.sent.labels(command.kind).inc()
                return True

    @contextlib.asynccontextmanager
    async def _server_slot(self, server: str):
        entry = self._server_slots.get(server)
        if entry is None:
            entry = self._server_slots[server] = [asyncio.Semaphore(self.max_per_server), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._server_slots[server]

    def _failed(self, command: Command, reason: str, detail: str) -> None:
        # One line per message that is not delivered; the token is not in it.
        log.warning("message not delivered", extra={**_where(command), "reason": reason, "detail": detail})
        self._count_failed(reason)

    def _give_up(self, command: Command, reason: str, detail: str) -> None:
        log.warning("message not kept", extra={**_where(command), "reason": reason, "detail": detail})
        if self.metrics:
            self.metrics.given_up.labels(reason).inc()

    def _forget(self, room: Room, held: Held) -> None:
        room.messages.remove(held)
        self._set_pending(self._pending - 1, self._pending_bytes - held.size)

    def _count_failed(self, reason: str) -> None:
        if self.metrics:
            self.metrics.failed.labels(reason).inc()

    def _count_retry(self, reason: str) -> None:
        if self.metrics:
            self.metrics.retried.labels(reason).inc()

    def _set_pending(self, count: int, size: int) -> None:
        self._pending = count
        self._pending_bytes = size
        if self.metrics:
            self.metrics.pending.set(count)
            self.metrics.pending_bytes.set(size)


def _where(command: Command) -> dict:
    return {"kind": command.kind, "server": command.bot.server, "room": command.room}
