"""The relay's catch-up after a resubscription, against a real Redis: two
recovery stores stand for two instances; B's subscription drops while A
logs, and B's connected sockets must get the gap from the shared log, in
offset order and once, before anything newer."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from channels_common.redis import Message
from channels_records.metrics import Metrics
from channels_records.recovery import RecoveryStore
from channels_records.relay import Relay

WINDOW = 1800 * 1000


async def wait_for_async(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Recorder:
    """The broadcaster's entry point the relay uses: what reached each room."""

    def __init__(self):
        self.sent: list[tuple[str, int, str | None]] = []

    def to_room(self, room, text, offset=None):
        body = json.loads(text[text.index("["):])[1]
        self.sent.append((room, body["n"], offset))
        return 1


def message(room: str, n: int) -> Message:
    return Message(channel="/records", data=json.dumps({"room": room, "n": n}).encode(), pattern=None)


async def log_on(store: RecoveryStore, room: str, n: int) -> str:
    done = asyncio.get_running_loop().create_future()
    store.log_batch([(room, "records", message(room, n).data)], lambda r, e: done.set_result(r[0]))
    return await done


@pytest.fixture
async def clients(redis_url):
    """Two instances' Redis clients (each store stands for one instance)."""
    a_client, b_client = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    yield a_client, b_client
    await a_client.aclose()
    await b_client.aclose()


async def test_the_gap_logged_by_another_instance_goes_out_first_in_order_and_once(clients, redis):
    a_client, b_client = clients
    a = RecoveryStore(a_client, window_ms=WINDOW, instance_id="a")
    b = RecoveryStore(b_client, window_ms=WINDOW, instance_id="b")
    out = Recorder()
    lost = []
    relay = Relay(out, Metrics(), b, rooms=lambda: ["group-1", "group-2"], on_lost=lost.append)
    await log_on(a, "group-1", 0)
    relay.handle_batch([message("group-1", 0)])
    await wait_for_async(lambda: len(out.sent) == 1)
    # B's subscription is down: A alone relays (and logs) these.
    gap = [await log_on(a, room, n) for n, room in [(1, "group-1"), (2, "group-2"), (3, "group-1"),
                                                     (4, "elsewhere")]]
    # A logs the new subscription's first message too, before B's read:
    # B's live copy gets the same offset and must not go out twice.
    await log_on(a, "group-1", 5)
    relay.resubscribed()
    # The new subscription's first messages, handed over before the
    # catch-up's read has been answered.
    relay.handle_batch([message("group-1", 5), message("group-2", 6)])
    await wait_for_async(lambda: len(out.sent) >= 6)
    assert [(room, n) for room, n, _ in out.sent] == [
        ("group-1", 0), ("group-1", 1), ("group-2", 2), ("group-1", 3), ("group-1", 5), ("group-2", 6),
    ]
    assert [o for _, n, o in out.sent if n in (1, 2, 3)] == gap[:3]
    assert lost == []
    await asyncio.sleep(0.1)
    assert len(out.sent) == 6


async def test_a_room_trimmed_past_the_last_offset_is_reported_lost(clients, redis):
    a_client, b_client = clients
    a = RecoveryStore(a_client, window_ms=WINDOW, instance_id="a", max_events_per_room=10)
    b = RecoveryStore(b_client, window_ms=WINDOW, instance_id="b", max_events_per_room=10)
    out = Recorder()
    lost = []
    relay = Relay(out, Metrics(), b, rooms=lambda: ["group-1", "group-2"], on_lost=lost.append)
    relay.handle_batch([message("group-1", 0)])
    await wait_for_async(lambda: len(out.sent) == 1)
    for n in range(1, 251):  # past the cap: the log is trimmed beyond B's last offset
        await log_on(a, "group-1", n)
    await log_on(a, "group-2", 1000)
    relay.resubscribed()
    await wait_for_async(lambda: lost)
    await wait_for_async(lambda: len(out.sent) == 2)
    assert lost == ["group-1"]
    assert [(room, n) for room, n, _ in out.sent] == [("group-1", 0), ("group-2", 1000)]


async def test_recovery_floors_hold_from_the_catch_up_until_live_events_pass_it(clients, redis):
    # The catch-up's events are newer than live copies still to come in rooms
    # it did not read (joined since): the broadcaster is told events are
    # unordered until a live event past everything caught up goes out.
    a_client, b_client = clients
    a = RecoveryStore(a_client, window_ms=WINDOW, instance_id="a")
    b = RecoveryStore(b_client, window_ms=WINDOW, instance_id="b")
    out = Recorder()
    out.unordered = False
    relay = Relay(out, Metrics(), b, rooms=lambda: ["group-1"])
    relay.handle_batch([message("group-1", 0)])
    await wait_for_async(lambda: len(out.sent) == 1)
    await log_on(a, "group-1", 1)
    relay.resubscribed()
    await wait_for_async(lambda: len(out.sent) == 2)
    assert out.unordered is True
    relay.handle_batch([message("group-1", 2)])
    await wait_for_async(lambda: len(out.sent) == 3)
    assert out.unordered is False
    assert [n for _, n, _ in out.sent] == [0, 1, 2]
