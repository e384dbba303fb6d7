"""A recovering socket joins its rooms only once the restore has read the
log; whatever this instance broadcast in between is read a second time
(fake store; the real one is exercised by the recovery integration tests)."""

from __future__ import annotations

import types

from channels_records.connections import Connections
from channels_records.protocol import RecoveryRequest
from channels_records.recovery import LoggedEvent, offset_key


class Store:
    def __init__(self, log):
        self.log = log
        self.reads = []

    async def restore(self, pid, token, offset):
        self.reads.append(offset)
        after = [e for e in self.log if offset is None or offset_key(e.offset) > offset_key(offset)]
        return types.SimpleNamespace(sid="s", rooms=["g"], missed=after)


def make(store, relayed):
    engine = types.SimpleNamespace(sockets={})
    return Connections(
        engine, None, None, None, None, store, order_key=offset_key, relayed_offset=lambda: relayed
    )


def ev(offset):
    return LoggedEvent(offset, "records", b"{}")


async def test_events_broadcast_during_the_restore_are_read_again():
    store = Store([ev("1-0"), ev("2-0"), ev("3-0")])
    c = make(store, relayed="3-0")  # 3-0 went out after the first read saw up to 2-0
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0"), ev("2-0")])
    assert [e.offset for e in missed] == ["1-0", "2-0", "3-0"]
    assert store.reads == ["2-0"]


async def test_no_second_read_when_the_first_saw_everything_broadcast():
    store = Store([ev("1-0")])
    c = make(store, relayed="1-0")
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0")])
    assert [e.offset for e in missed] == ["1-0"] and store.reads == []
    c = make(store, relayed=None)
    assert await c._missed_meanwhile(RecoveryRequest("p" * 20, None), "tok", []) == []
    assert store.reads == []


async def test_nothing_missed_and_something_broadcast_meanwhile():
    store = Store([ev("5-0")])
    c = make(store, relayed="5-0")
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "4-0"), "tok", [])
    assert [e.offset for e in missed] == ["5-0"] and store.reads == ["4-0"]


class Metrics:
    def __init__(self):
        self.seen = []
        outer = self

        class Counter:
            def __init__(self, label):
                self.label = label

            def inc(self):
                outer.seen.append(self.label)

            def dec(self):
                outer.seen.append("-" + self.label)

        self.recoveries = types.SimpleNamespace(labels=lambda label: Counter(label))
        self.connected = Counter("connected")


def wired(store, feed):
    from channels_records.broadcast import Broadcaster
    from channels_records.sockets import Engine, EngineSocket, Rooms

    engine = Engine()
    engine.sockets["e0"] = EngineSocket(engine, "e0", "", "polling")
    rooms = Rooms()
    broadcaster = Broadcaster(engine, rooms, limit_bytes=10_000, on_overflow=lambda e: None, order_key=offset_key)
    metrics = Metrics()
    c = Connections(engine, rooms, broadcaster, None, metrics, store, order_key=offset_key,
                    relayed_offset=lambda: None, feed=feed)
    return c, engine.sockets["e0"], rooms, broadcaster, metrics


async def test_no_recovery_while_the_subscription_is_down():
    """Issue 25: what is published before the subscription is live never
    reaches this instance; the log read alone would leave a silent gap."""
    store = Store([ev("1-0")])
    c, sock, rooms, broadcaster, metrics = wired(store, feed=lambda: None)
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is False
    assert store.reads == [] and metrics.seen == ["refused"]
    assert rooms.sid_of == {} and sock.pending == []


async def test_a_subscription_lost_during_the_recovery_gives_a_fresh_session():
    store = Store([ev("1-0")])
    generations = iter([3, 4])
    c, sock, rooms, broadcaster, metrics = wired(store, feed=lambda: next(generations))
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is False
    assert metrics.seen == ["refused"]
    assert rooms.sid_of == {} and rooms.members == {} and sock.pending == []
    assert "e0" in broadcaster.held  # still held for the fresh CONNECT that follows


async def test_a_recovery_on_a_steady_subscription_replays_then_releases():
    store = Store([ev("1-0"), ev("2-0")])
    c, sock, rooms, broadcaster, metrics = wired(store, feed=lambda: 7)
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is True
    assert sock.take_pending() == ['40{"sid":"s","pid":"' + "p" * 20 + '"}', '42["records",{},"1-0"]',
                                   '42["records",{},"2-0"]']
    assert broadcaster.floor_offsets == {"e0": frozenset({"1-0", "2-0"})}
    assert "recovered" in metrics.seen and "e0" not in broadcaster.held
    assert rooms.of_sid == {"s": {"g"}}


async def test_anything_relayed_during_the_read_means_a_second_read_whatever_its_offset():
    """Issue 25: a copy relayed with an older event's offset (a dedup that
    matched the wrong occurrence) must not hide that something went out."""
    store = Store([ev("1-0"), ev("2-0"), ev("3-0")])
    c = make(store, relayed="1-0")
    missed = await c._missed_meanwhile(
        RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0"), ev("2-0")], relayed_meanwhile=True
    )
    assert [e.offset for e in missed] == ["1-0", "2-0", "3-0"] and store.reads == ["2-0"]


async def test_a_failed_second_read_is_no_replay():
    class Failing(Store):
        async def restore(self, pid, token, offset):
            raise OSError("redis went away")

    c = make(Failing([]), relayed="3-0")
    c.lookup_timeout = 0.2  # its retries give up after twice this
    assert await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0")]) is None


async def test_a_second_read_redis_refuses_for_a_moment_is_asked_again():
    """Issue 24 (soak seed 11): a stale pooled connection after a Redis
    restart failed the second read, and the client started afresh."""
    class Flaky(Store):
        failures = 2

        async def restore(self, pid, token, offset):
            if self.failures:
                self.failures -= 1
                raise OSError("stale connection")
            return await super().restore(pid, token, offset)

    store = Flaky([ev("1-0"), ev("2-0"), ev("3-0")])
    c = make(store, relayed="3-0")
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0")])
    assert [e.offset for e in missed] == ["1-0", "2-0", "3-0"] and store.failures == 0


async def test_a_recovery_waits_a_moment_for_the_subscription():
    store = Store([ev("1-0")])
    live = []

    async def wait_feed(timeout):
        live.append(timeout)

    c, sock, rooms, broadcaster, metrics = wired(store, feed=lambda: 1 if live else None)
    c.wait_feed = wait_feed
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is True
    assert live == [c.lookup_timeout] and store.reads == ["0-1"] and "recovered" in metrics.seen
    assert sock.take_pending()[1:] == ['42["records",{},"1-0"]'] and rooms.of_sid == {"s": {"g"}}


async def test_a_restore_redis_cannot_answer_yet_is_asked_again():
    """Issue 24: right after a Redis restart the subscription is live
    while Redis still answers LOADING; the recovery waits for it rather
    than giving a fresh session."""
    from redis.exceptions import BusyLoadingError

    class Loading(Store):
        def __init__(self, log, refusals):
            super().__init__(log)
            self.refusals = refusals

        async def restore(self, pid, token, offset):
            if self.refusals:
                self.refusals -= 1
                raise BusyLoadingError("Redis is loading the dataset in memory")
            return await super().restore(pid, token, offset)

    store = Loading([ev("1-0")], refusals=3)
    c, sock, _rooms, broadcaster, metrics = wired(store, feed=lambda: 7)
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is True
    assert "recovered" in metrics.seen and store.refusals == 0
    assert sock.take_pending()[1:] == ['42["records",{},"1-0"]']


async def test_a_restore_redis_never_answers_gives_a_fresh_session():
    from redis.exceptions import BusyLoadingError

    class Down(Store):
        async def restore(self, pid, token, offset):
            raise BusyLoadingError("Redis is loading the dataset in memory")

    store = Down([])
    c, sock, rooms, broadcaster, metrics = wired(store, feed=lambda: 7)
    c.lookup_timeout = 0.2
    broadcaster.hold("e0")
    assert await c._recover("e0", "tok", RecoveryRequest("p" * 20, "0-1")) is False
    assert metrics.seen == ["error"] and rooms.sid_of == {} and sock.pending == []
