"""Delivery: one ordered queue per room, a global bound on concurrent sends,
and the retry policy.

Messages for one (homeserver, room) go out in the order received, each one
finished (delivered or given up) before the next starts. Different rooms and
bots proceed concurrently, but never more than `max_concurrent` requests to
homeservers at once, and never more than `max_per_server` to one homeserver,
so a slow homeserver can neither tie up the process nor starve the others.
Waiting out a backoff does not hold a slot. Queues exist only while they hold
messages, and the total number of messages held is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from channels_common.tasks import spawn

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


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        *,
        policy: RetryPolicy = RetryPolicy(),
        max_concurrent: int = 20,
        max_per_server: int = 10,
        max_pending: int = 10000,
        metrics: BotsMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.transport = transport
        self.policy = policy
        self.max_pending = max_pending
        self.metrics = metrics
        self._sleep = sleep
        self._slots = asyncio.Semaphore(max_concurrent)
        self.max_per_server = max_per_server
        # Per homeserver: its semaphore and how many workers use it, so the
        # entry goes away with the last one.
        self._server_slots: dict[str, list] = {}
        self._queues: dict[tuple[str, str], deque[Command]] = {}
        self._workers: dict[tuple[str, str], asyncio.Task] = {}
        self._pending = 0
        self._closing = False

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def accepting(self) -> bool:
        return not self._closing

    def submit(self, command: Command) -> bool:
        """Queue a command behind the others for its room; False if refused."""
        if self._closing:
            self._failed(command, "shutting_down", "received during shutdown")
            return False
        if self._pending >= self.max_pending:
            self._failed(command, "overloaded", f"{self._pending} messages already pending")
            return False
        key = command.queue_key
        self._queues.setdefault(key, deque()).append(command)
        self._set_pending(self._pending + 1)
        if key not in self._workers:
            self._workers[key] = spawn(self._drain(key), name="bots-room-queue")
        return True

    async def close(self, timeout: float) -> int:
        """Stop taking messages, give the queued and in-flight ones `timeout`
        seconds, then abandon the rest. Returns how many were abandoned."""
        self._closing = True
        workers = list(self._workers.values())
        if workers:
            await asyncio.wait(workers, timeout=timeout)
        abandoned = self._pending
        for task in list(self._workers.values()):
            task.cancel()
        for task in list(self._workers.values()):
            # _drain handles its own errors; cancellation is all that is left.
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if abandoned:
            log.warning("shutdown: messages not delivered", extra={"count": abandoned})
            if self.metrics:
                self.metrics.failed.labels("shutdown").inc(abandoned)
        self._queues.clear()
        self._workers.clear()
        self._set_pending(0)
        return abandoned

    # -- internals ---------------------------------------------------------------

    async def _drain(self, key: tuple[str, str]) -> None:
        queue = self._queues[key]
        try:
            while queue:
                command = queue[0]
                try:
                    await self._deliver(command)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug must cost one message, not the room's queue.
                    log.exception("delivery crashed", extra=_where(command))
                    self._count_failed("internal")
                queue.popleft()
                self._set_pending(self._pending - 1)
        finally:
            # No await between the emptiness check and removal: a submit
            # either lands in this queue before or starts a new worker after.
            if self._workers.get(key) is asyncio.current_task():
                del self._workers[key]
                self._queues.pop(key, None)

    async def _deliver(self, command: Command) -> None:
        policy = self.policy
        failures = 0
        rate_limited = 0
        async with self.transport.lease(command) as client:
            while True:
                try:
                    async with self._server_slot(command.bot.server), self._slots:
                        await self.transport.deliver(client, command)
                except Permanent as error:
                    self._failed(command, error.reason, error.detail)
                    return
                except RateLimited as error:
                    rate_limited += 1
                    if rate_limited > policy.max_rate_limited:
                        self._failed(command, "gave_up", f"rate limited {rate_limited} times")
                        return
                    self._count_retry("rate_limited")
                    await self._sleep(min(error.retry_after, policy.max_rate_limit_wait))
                    continue
                except Transient as error:
                    failures += 1
                    if failures >= policy.max_attempts:
                        self._failed(command, "gave_up", f"{failures} attempts, last {error}")
                        return
                    self._count_retry(error.reason)
                    delay = policy.backoff(failures)
                    log.info(
                        "delivery failed, retrying",
                        extra={**_where(command), "error": str(error), "attempt": failures, "delay": round(delay, 3)},
                    )
                    await self._sleep(delay)
                    continue
                if self.metrics:
                    self.metrics.sent.labels(command.kind).inc()
                return

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

    def _count_failed(self, reason: str) -> None:
        if self.metrics:
            self.metrics.failed.labels(reason).inc()

    def _count_retry(self, reason: str) -> None:
        if self.metrics:
            self.metrics.retried.labels(reason).inc()

    def _set_pending(self, value: int) -> None:
        self._pending = value
        if self.metrics:
            self.metrics.pending.set(value)


def _where(command: Command) -> dict:
    return {"kind": command.kind, "server": command.bot.server, "room": command.room}
