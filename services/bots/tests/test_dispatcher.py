"""Ordering, concurrency bound, retry policy and shutdown of the dispatcher,
with a fake transport whose answers each test scripts."""

from __future__ import annotations

import asyncio
import contextlib

from channels_bots.dispatcher import Dispatcher, RetryPolicy
from channels_bots.errors import Permanent, RateLimited, Transient
from channels_bots.messages import Bot, Command
from channels_bots.metrics import BotsMetrics


def command(room: str, body: str, token: str = "t1", kind: str = "publish") -> Command:
    return Command(kind, Bot("https://hs.example", token), room, {"msgtype": "m.text", "body": body},
                   f"txn-{kind}-{token}-{room}-{body}")


class FakeTransport:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.delivered: list[tuple[str, str]] = []  # (room, body)
        self.attempts: list[tuple[str, str]] = []  # (body, txn id)
        self.failures: dict[str, list[Exception]] = {}  # body -> errors to raise first
        self.active = 0
        self.peak = 0
        self.leases: list[str] = []
        self.gate: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def lease(self, cmd: Command):
        self.leases.append("fresh" if cmd.fresh_client else "cached")
        yield object()

    async def deliver(self, client, cmd: Command) -> str:
        body = cmd.content["body"]
        self.attempts.append((body, cmd.txn_id))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            errors = self.failures.get(body)
            if errors:
                raise errors.pop(0)
            self.delivered.append((cmd.room, body))
            return "$event"
        finally:
            self.active -= 1


class Sleeps:
    """asyncio.sleep replacement that records the delays and does not wait."""

    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def drain(dispatcher: Dispatcher, timeout: float = 5.0) -> None:
    async def empty():
        while dispatcher.pending:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(empty(), timeout)


def value(metrics: BotsMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_each_room_is_delivered_in_order_and_rooms_proceed_concurrently():
    transport = FakeTransport(delay=0.002)
    dispatcher = Dispatcher(transport, max_concurrent=10)
    rooms = ["#a:x", "#b:x", "#c:x"]
    for i in range(20):
        for room in rooms:
            assert dispatcher.submit(command(room, f"{room}-{i}"))
    await drain(dispatcher)
    for room in rooms:
        assert [b for r, b in transport.delivered if r == room] == [f"{room}-{i}" for i in range(20)]
    # One send per room at a time, so ordering holds; the rooms overlapped.
    assert transport.peak == 3


async def test_global_concurrency_bound_holds_across_rooms():
    transport = FakeTransport(delay=0.005)
    dispatcher = Dispatcher(transport, max_concurrent=4)
    for i in range(30):
        dispatcher.submit(command(f"#room{i}:x", "m"))
    await drain(dispatcher)
    assert len(transport.delivered) == 30
    assert transport.peak == 4


async def test_transient_errors_back_off_exponentially_with_the_same_transaction_id():
    transport = FakeTransport()
    transport.failures["m"] = [Transient("network"), Transient("server_error"), Transient("server_error")]
    sleeps = Sleeps()
    metrics = BotsMetrics()
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=30.0)
    dispatcher = Dispatcher(transport, policy=policy, sleep=sleeps, metrics=metrics)
    dispatcher.submit(command("#a:x", "m"))
    await drain(dispatcher)
    assert transport.delivered == [("#a:x", "m")]
    assert len({txn for _, txn in transport.attempts}) == 1 and len(transport.attempts) == 4
    # Ceilings 1, 2, 4 seconds, each jittered into [ceiling/2, ceiling].
    for delay, ceiling in zip(sleeps.delays, [1.0, 2.0, 4.0], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert value(metrics, "bots_messages_retried_total", reason="network") == 1
    assert value(metrics, "bots_messages_retried_total", reason="server_error") == 2
    assert value(metrics, "bots_messages_sent_total", kind="publish") == 1


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0)
    assert policy.backoff(1, rng=lambda: 1.0) == 0.5
    assert policy.backoff(3, rng=lambda: 1.0) == 2.0
    assert policy.backoff(30, rng=lambda: 1.0) == 10.0
    assert policy.backoff(30, rng=lambda: 0.0) == 5.0


async def test_rate_limits_wait_exactly_as_asked_and_do_not_use_up_attempts():
    transport = FakeTransport()
    transport.failures["m"] = [RateLimited(0.25), RateLimited(1.5)] * 3
    sleeps = Sleeps()
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, policy=RetryPolicy(max_attempts=2), sleep=sleeps, metrics=metrics)
    dispatcher.submit(command("#a:x", "m"))
    await drain(dispatcher)
    assert transport.delivered == [("#a:x", "m")]
    assert sleeps.delays == [0.25, 1.5] * 3
    assert value(metrics, "bots_messages_retried_total", reason="rate_limited") == 6


async def test_permanent_failures_are_not_retried_and_the_queue_carries_on(caplog):
    transport = FakeTransport()
    transport.failures["bad"] = [Permanent("unknown_token", "send: HTTP 401")]
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, sleep=Sleeps(), metrics=metrics)
    for body in ("first", "bad", "last"):
        dispatcher.submit(command("#a:x", body, token="secret-token-xyz"))
    await drain(dispatcher)
    assert transport.delivered == [("#a:x", "first"), ("#a:x", "last")]
    assert [b for b, _ in transport.attempts].count("bad") == 1
    assert value(metrics, "bots_messages_failed_total", reason="unknown_token") == 1
    lines = [r for r in caplog.records if r.getMessage() == "message not delivered"]
    assert len(lines) == 1 and lines[0].reason == "unknown_token"
    assert "secret-token-xyz" not in caplog.text


async def test_gives_up_after_max_attempts():
    transport = FakeTransport()
    transport.failures["m"] = [Transient("server_error")] * 10
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, policy=RetryPolicy(max_attempts=3), sleep=Sleeps(), metrics=metrics)
    dispatcher.submit(command("#a:x", "m"))
    dispatcher.submit(command("#a:x", "next"))
    await drain(dispatcher)
    assert [b for b, _ in transport.attempts] == ["m", "m", "m", "next"]
    assert transport.delivered == [("#a:x", "next")]
    assert value(metrics, "bots_messages_failed_total", reason="gave_up") == 1


async def test_a_crash_in_delivery_costs_one_message_only():
    transport = FakeTransport()
    transport.failures["boom"] = [RuntimeError("bug")]
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, metrics=metrics)
    dispatcher.submit(command("#a:x", "boom"))
    dispatcher.submit(command("#a:x", "after"))
    await drain(dispatcher)
    assert transport.delivered == [("#a:x", "after")]
    assert value(metrics, "bots_messages_failed_total", reason="internal") == 1


async def test_pending_messages_are_bounded():
    transport = FakeTransport()
    transport.gate = asyncio.Event()
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, max_pending=5, metrics=metrics)
    accepted = [dispatcher.submit(command(f"#r{i % 2}:x", str(i))) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert value(metrics, "bots_messages_given_up_total", reason="count") == 3
    transport.gate.set()
    await drain(dispatcher)
    assert len(transport.delivered) == 5
    assert value(metrics, "bots_pending_messages") == 0


async def test_queues_are_released_once_empty():
    dispatcher = Dispatcher(FakeTransport())
    for i in range(50):
        dispatcher.submit(command(f"#room{i}:x", "m"))
    await drain(dispatcher)
    await asyncio.sleep(0)
    assert dispatcher._rooms == {} and dispatcher._workers == {}


async def test_test_messages_use_a_fresh_client_and_publishes_a_cached_one():
    transport = FakeTransport()
    dispatcher = Dispatcher(transport)
    dispatcher.submit(command("#a:x", "t", kind="test"))
    dispatcher.submit(command("#a:x", "p", kind="publish"))
    await drain(dispatcher)
    assert transport.leases == ["fresh", "cached"]


async def test_close_finishes_in_flight_work_within_the_grace_period():
    transport = FakeTransport(delay=0.05)
    dispatcher = Dispatcher(transport)
    for i in range(3):
        dispatcher.submit(command("#a:x", str(i)))
    abandoned = await dispatcher.close(timeout=5.0)
    assert abandoned == 0
    assert [b for _, b in transport.delivered] == ["0", "1", "2"]
    assert not dispatcher.submit(command("#a:x", "late"))


async def test_close_abandons_what_does_not_finish_in_time(caplog):
    transport = FakeTransport()
    transport.gate = asyncio.Event()  # never opens: a homeserver that hangs
    metrics = BotsMetrics()
    dispatcher = Dispatcher(transport, metrics=metrics)
    for i in range(4):
        dispatcher.submit(command(f"#r{i % 2}:x", str(i)))
    await asyncio.sleep(0.01)
    abandoned = await dispatcher.close(timeout=0.05)
    assert abandoned == 4
    assert transport.delivered == []
    assert value(metrics, "bots_messages_given_up_total", reason="shutdown") == 4
    assert value(metrics, "bots_pending_messages") == 0
    assert "shutdown: messages not delivered" in caplog.text


async def test_a_slow_homeserver_cannot_take_every_slot():
    class TwoServers(FakeTransport):
        async def deliver(self, client, cmd):
            if cmd.bot.server == "https://slow.example":
                self.attempts.append((cmd.content["body"], cmd.txn_id))
                await asyncio.Event().wait()  # never answers
            self.delivered.append((cmd.room, cmd.content["body"]))
            return "$event"

    transport = TwoServers()
    dispatcher = Dispatcher(transport, max_concurrent=4, max_per_server=2)
    slow = Bot("https://slow.example", "t")
    for i in range(10):
        dispatcher.submit(Command("publish", slow, f"#r{i}:slow", {"body": f"slow-{i}"}, f"slow-{i}"))
    for i in range(10):
        dispatcher.submit(command(f"#r{i}:x", f"fast-{i}"))

    async def fast_done():
        while len(transport.delivered) < 10:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(fast_done(), 5)
    assert len(transport.attempts) == 2  # the slow homeserver holds two slots, no more
    assert dispatcher._server_slots.keys() == {"https://slow.example"}
    await dispatcher.close(timeout=0.01)
    assert dispatcher._server_slots == {}
