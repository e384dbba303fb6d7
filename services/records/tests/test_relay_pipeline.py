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

from tests.support import settle


class Answer:
    """One log_batch call, answered by the test."""

    def __init__(self, on_done):
        self.on_done = on_done

    def set_result(self, result):
        self.on_done(result if isinstance(result, list) else [result], None)

    def set_exception(self, error):
        self.on_done(None, error)


class ManualStore:
    """Each call waits until the test answers it."""

    def __init__(self):
        self.calls: list[tuple[object, Answer]] = []

    def log_batch(self, messages, on_done):
        numbers = [json.loads(data)["n"] for _, _, data in messages]
        self.calls.append((numbers[0] if len(numbers) == 1 else numbers, Answer(on_done)))


class Recorder:
    def __init__(self):
        self.sent = []

    def to_room(self, room, text, offset=None):
        self.sent.append((room, text, offset))
        return 1


def record(n, room="group-1"):
    return Message(channel="/records", data=json.dumps({"room": room, "n": n}).encode(), pattern=None)


async def test_calls_overlap_and_broadcasts_keep_publish_order():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    for n in range(3):
        await relay.handle(record(n))
    await settle(5)
    assert [n for n, _ in store.calls] == [0, 1, 2]  # all three in flight at once
    store.calls[2][1].set_result("3-0")
    store.calls[1][1].set_result("2-0")
    await settle(5)
    assert out.sent == []  # 0 is not logged yet: nothing may overtake it
    store.calls[0][1].set_result("1-0")
    await settle(5)
    assert [o for _, _, o in out.sent] == ["1-0", "2-0", "3-0"]
    assert out.sent[0][1] == '2["records",{"room": "group-1", "n": 0},"1-0"]'
    assert relay.last_offset == "3-0"


async def test_a_failed_log_sends_without_offset_in_its_place():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    await relay.handle(record(0))
    await relay.handle(record(1))
    await settle(5)
    store.calls[0][1].set_exception(RedisConnectionError("down"))
    store.calls[1][1].set_result("5-0")
    await settle(5)
    assert [o for _, _, o in out.sent] == [None, "5-0"]
    assert relay.last_offset == "5-0"


async def test_bad_messages_are_dropped_without_holding_up_the_rest():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    await relay.handle(Message(channel="/records", data=b"{not json", pattern=None))
    await relay.handle(record(7))
    await settle(5)
    store.calls[0][1].set_result("1-0")
    await settle(5)
    assert len(out.sent) == 1 and len(store.calls) == 1


async def test_reading_pauses_while_too_many_are_in_flight():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store, max_in_flight=2)
    await relay.handle(record(0))
    third = asyncio.ensure_future(relay.handle(record(1)))
    await settle(5)
    assert not third.done()  # the subscription waits before reading on
    store.calls[0][1].set_result("1-0")
    await settle(5)
    assert third.done() and len(out.sent) == 1


async def test_without_a_store_broadcasts_at_once():
    out = Recorder()
    relay = Relay(out, Metrics(), None)
    await relay.handle(record(1))
    assert out.sent and out.sent[0][2] is None


async def test_a_batch_is_logged_in_one_call_and_broadcast_in_order():
    store, out = ManualStore(), Recorder()
    relay = Relay(out, Metrics(), store)
    bad = Message(channel="/records", data=b"[1]", pattern=None)
    assert relay.handle_batch([record(0), bad, record(1, room="user-9"), record(2)]) is None
    assert relay.handle_batch([record(3)]) is None
    await settle(5)
    assert [n for n, _ in store.calls] == [[0, 1, 2], 3]  # the bad one never reaches the log
    store.calls[1][1].set_result("9-0")
    await settle(5)
    assert out.sent == []  # the first batch is not logged yet
    store.calls[0][1].set_result(["6-0", RedisConnectionError("lost"), "8-0"])
    await settle(5)
    assert [(room, o) for room, _, o in out.sent] == [
        ("group-1", "6-0"), ("user-9", None), ("group-1", "8-0"), ("group-1", "9-0"),
    ]
    assert relay.last_offset == "9-0"


async def test_a_batch_without_a_store_goes_out_at_once_in_order():
    out = Recorder()
    relay = Relay(out, Metrics(), None)
    assert relay.handle_batch([record(1), record(2, room="user-3")]) is None
    assert [(room, o) for room, _, o in out.sent] == [("group-1", None), ("user-3", None)]


async def test_a_store_that_answers_at_once_still_keeps_the_order():
    class Refusing:
        def log_batch(self, messages, on_done):
            on_done(None, RedisConnectionError("backlog full"))

    out = Recorder()
    relay = Relay(out, Metrics(), Refusing())
    assert relay.handle_batch([record(1), record(2)]) is None
    assert relay.handle_batch([record(3)]) is None
    assert [(json.loads(t[t.index("{") : t.rindex("}") + 1])["n"], o) for _, t, o in out.sent] == [
        (1, None), (2, None), (3, None),
    ]
    assert not relay._in_flight


class EpochStore(ManualStore):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def log_batch(self, messages, on_done):
        super().log_batch(messages, on_done)
        self.calls[-1] = (self.calls[-1][0], self.calls[-1][1], self.epochs[-1] if self.epochs else None)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


async def test_an_epoch_marker_splits_a_batch_and_is_never_broadcast():
    """Issue 25: what came before a marker is logged in the old epoch, what
    follows in the new one, in publish order."""
    store, out = EpochStore(), Recorder()
    relay = Relay(out, Metrics(), store, epoch_channel="recovery:epoch")
    marker = Message(channel="recovery:epoch", data=b"7", pattern=None)
    garbage = Message(channel="recovery:epoch", data=b"seven", pattern=None)
    relay.handle_batch([record(0), record(1), marker, record(2)])
    relay.handle_batch([garbage, record(3)])
    assert [(n, epoch) for n, _, epoch in store.calls] == [([0, 1], None), (2, 7), (3, None)]
    assert store.epochs == [7, None]  # a marker that is not ours: back to the start-time count
    store.calls[0][1].set_result(["1-0", "2-0"])
    for i, (_, answer, _) in enumerate(store.calls[1:], start=3):
        answer.set_result(f"{i}-0")
    await settle(5)
    assert [o for _, _, o in out.sent] == ["1-0", "2-0", "3-0", "4-0"]
