"""The relay keeps several recovery-log calls in flight and still
broadcasts in publish order (fake store and broadcaster; the real Redis store
is exercised by the recovery tests)."""

from __future__ import annotations

import asyncio
import json

from channels_common.redis import Message
from channels_records.metrics import Metrics
from channels_records.relay import Relay
from redis.exceptions import ConnectionError as RedisConnectionError


class ManualStore:
    """Each call waits until the test answers it."""

    def __init__(self):
        self.calls: list[tuple[str, asyncio.Future]] = []

    async def log_message(self, room, event, data):
        future = asyncio.get_running_loop().create_future()
        self.calls.append((json.loads(data)["n"], future))
        return await future


class Recorder:
    def __init__(self):
        self.sent = []

    def to_room(self, room, text, offset=None):
        self.sent.append((room, text, offset))
        return 1


def record(n, room="group-1"):
    return Message(channel="/records", data=json.dumps({"room": room, "n": n}).encode(), pattern=None)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_calls_overlap_and_broadcasts_keep_publish_order():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    for n in range(3):
        await relay.handle(record(n))
    await settle()
    assert [n for n, _ in store.calls] == [0, 1, 2]  # all three in flight at once
    store.calls[2][1].set_result("3-0")
    store.calls[1][1].set_result("2-0")
    await settle()
    assert out.sent == []  # 0 is not logged yet: nothing may overtake it
    store.calls[0][1].set_result("1-0")
    await settle()
    assert [o for _, _, o in out.sent] == ["1-0", "2-0", "3-0"]
    assert out.sent[0][1] == '2["records",{"room": "group-1", "n": 0},"1-0"]'
    assert relay.last_offset == "3-0"


async def test_a_failed_log_sends_without_offset_in_its_place():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    await relay.handle(record(0))
    await relay.handle(record(1))
    await settle()
    store.calls[0][1].set_exception(RedisConnectionError("down"))
    store.calls[1][1].set_result("5-0")
    await settle()
    assert [o for _, _, o in out.sent] == [None, "5-0"]
    assert relay.last_offset == "5-0"


async def test_bad_messages_are_dropped_without_holding_up_the_rest():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    await relay.handle(Message(channel="/records", data=b"{not json", pattern=None))
    await relay.handle(record(7))
    await settle()
    store.calls[0][1].set_result("1-0")
    await settle()
    assert len(out.sent) == 1 and len(store.calls) == 1


async def test_reading_pauses_while_too_many_are_in_flight():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store, max_in_flight=2)
    await relay.handle(record(0))
    third = asyncio.ensure_future(relay.handle(record(1)))
    await settle()
    assert not third.done()  # the subscription waits before reading on
    store.calls[0][1].set_result("1-0")
    await settle()
    assert third.done() and len(out.sent) == 1


async def test_without_a_store_broadcasts_at_once():
    out = Recorder()
    relay = Relay(out, Metrics(), None)
    await relay.handle(record(1))
    assert out.sent and out.sent[0][2] is None
