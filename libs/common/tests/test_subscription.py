"""The pub/sub subscription against a real Redis: order, batches, handler
failures, a Redis restart and a connection that goes silent."""

from __future__ import annotations

import asyncio
import logging

import pytest
from channels_common.redis import Message, Subscription, create_redis

from tests.support import until


async def publish_burst(redis, n: int) -> None:
    """n messages b"0".. in one pipelined write, so that they arrive together."""
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.publish("/records", b"%d" % i)
        await pipe.execute()


def held_at(first: bytes):
    """A handler that records each message's data and holds the feed at
    `first` until the gate is set."""
    got: list[bytes] = []
    gate = asyncio.Event()

    async def handler(message: Message):
        if message.data == first:
            await gate.wait()
        got.append(message.data)

    return got, gate, handler


async def test_messages_arrive_in_publish_order_with_their_channel_and_pattern(redis_url, redis):
    got: list[Message] = []
    sub = Subscription(url=redis_url, handler=got.append, channels=["/records"], patterns=["chatbot/*"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        big = b"x" * 1_000_000  # many socket reads
        for i in range(200):
            await redis.publish("/records", b"%d" % i)
        await redis.publish("chatbot/matrix", big)
        await redis.publish("elsewhere", b"not subscribed")
        await redis.publish("/records", b"last")
        await until(lambda: len(got) == 202, what="all messages")
        assert [m.data for m in got[:200]] == [b"%d" % i for i in range(200)]
        assert got[200] == Message(channel="chatbot/matrix", data=big, pattern="chatbot/*")
        assert got[201] == Message(channel="/records", data=b"last", pattern=None)
    finally:
        await sub.stop()
    assert not sub.live


async def test_a_batch_handler_gets_every_message_once_in_order(redis_url, redis):
    batches: list[list[Message]] = []
    sub = Subscription(url=redis_url, batch_handler=batches.append, channels=["/records"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        await publish_burst(redis, 500)
        await until(lambda: sum(map(len, batches)) >= 500, what="all messages")
        assert [m.data for b in batches for m in b] == [b"%d" % i for i in range(500)]
        assert len(batches) < 500  # one pipelined burst arrives in fewer reads than messages
    finally:
        await sub.stop()


async def test_a_failing_handler_is_logged_and_the_next_message_handled(redis_url, redis, caplog):
    got = []

    async def handler(message: Message):
        if message.data == b"boom":
            raise RuntimeError("handler bug")
        got.append(message.data)

    sub = Subscription(url=redis_url, handler=handler, channels=["/records"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        with caplog.at_level(logging.ERROR, logger="channels.redis"):
            for data in (b"1", b"boom", b"2"):
                await redis.publish("/records", data)
            await until(lambda: got == [b"1", b"2"], what="messages after the failure")
        assert any("handler failed" in r.getMessage() for r in caplog.records)
        assert sub.live
    finally:
        await sub.stop()


async def test_a_redis_restart_is_survived(private_redis):
    got = []
    lives = []
    reconnects = []
    sub = Subscription(
        url=private_redis.url,
        handler=lambda m: got.append(m.data),
        channels=["/records"],
        on_live=lambda: lives.append(1),
        on_reconnect=lambda: reconnects.append(1),
        max_backoff=0.2,
    )
    sub.start()
    client = create_redis(private_redis.url)
    try:
        assert await sub.wait_live(10)
        await client.publish("/records", b"before")
        await until(lambda: got == [b"before"], what="first message")
        private_redis.kill()
        await until(lambda: not sub.live, what="the subscription to notice")
        private_redis.start()
        assert await sub.wait_live(15)
        await client.aclose()
        client = create_redis(private_redis.url)  # the old pool's connection died with the server
        await client.publish("/records", b"after")
        await until(lambda: got == [b"before", b"after"], what="message after the restart")
        assert len(lives) == 2 and len(reconnects) == 1
    finally:
        await client.aclose()
        await sub.stop()


class FreezingProxy:
    """A TCP proxy whose existing connections can be made to swallow all
    traffic, as a half-open connection does; new connections pass."""

    def __init__(self, port: int):
        self.port = port
        self.frozen: list[asyncio.Event] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        self.connections += 1
        frozen = asyncio.Event()
        self.frozen.append(frozen)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    if not frozen.is_set():
                        dst.write(data)
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def freeze_all(self):
        for event in self.frozen:
            event.set()

    async def close(self):
        self.server.close()


async def test_a_silent_connection_is_pinged_then_replaced(redis_url, redis, caplog):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = FreezingProxy(port)
    proxy_port = await proxy.start()
    got = []
    sub = Subscription(
        url=f"redis://127.0.0.1:{proxy_port}/0",
        handler=lambda m: got.append(m.data),
        channels=["/records"],
        idle_ping_seconds=0.2,
        max_backoff=0.2,
    )
    sub.start()
    try:
        assert await sub.wait_live(10)
        await asyncio.sleep(0.5)  # idle but answering pings: stays on its connection
        assert sub.live and proxy.connections == 1
        with caplog.at_level(logging.WARNING, logger="channels.redis"):
            proxy.freeze_all()
            await until(lambda: not sub.live, what="the silent connection to be dropped")
        assert any("silent" in r.getMessage() for r in caplog.records)
        assert await sub.wait_live(10)
        assert proxy.connections == 2
        await redis.publish("/records", b"on the new connection")
        await until(lambda: got == [b"on the new connection"], what="message on the new connection")
    finally:
        await sub.stop()
        await proxy.close()


def test_exactly_one_handler_is_required():
    import pytest

    with pytest.raises(ValueError):
        Subscription(url="redis://x", channels=["a"])
    with pytest.raises(ValueError):
        Subscription(url="redis://x", handler=print, batch_handler=print, channels=["a"])


async def test_a_slow_async_handler_holds_the_feed_and_keeps_the_order(redis_url, redis):
    got = []
    running = 0
    overlapped = False

    async def handler(message: Message):
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        await asyncio.sleep(0.005)
        got.append(message.data)
        running -= 1

    sub = Subscription(url=redis_url, handler=handler, channels=["/records"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        await publish_burst(redis, 40)
        await until(lambda: len(got) == 40, what="all messages")
        assert got == [b"%d" % i for i in range(40)]
        assert not overlapped  # one at a time
    finally:
        await sub.stop()


async def test_a_batch_handler_may_hold_the_feed_with_an_awaitable(redis_url, redis):
    batches = []
    gate = asyncio.Event()

    def handler(messages):
        batches.append([m.data for m in messages])
        if len(batches) == 1:
            return gate.wait()  # e.g. the relay waiting for room
        return None

    sub = Subscription(url=redis_url, batch_handler=handler, channels=["/records"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        await redis.publish("/records", b"first")
        await until(lambda: len(batches) == 1, what="the first batch")
        for i in range(5):
            await redis.publish("/records", b"%d" % i)
        await asyncio.sleep(0.2)
        assert len(batches) == 1  # held
        gate.set()
        await until(lambda: sum(map(len, batches)) == 6, what="the held messages")
        assert [d for b in batches for d in b] == [b"first", b"0", b"1", b"2", b"3", b"4"]
    finally:
        await sub.stop()


def _plain_redis(command: list[bytes]) -> bytes:
    name = command[0].upper()
    if name == b"SUBSCRIBE":
        return b"".join(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(c), c) for c in command[1:])
    if name == b"PING":
        return b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    return b"+OK\r\n"  # CLIENT SETINFO and whatever else redis-py sends on connect


async def test_garbage_from_redis_drops_that_connection_and_the_next_one_carries_on(caplog):
    from tests.support import ScriptedRedis

    fake = ScriptedRedis(_plain_redis)
    url = await fake.start()
    got = []
    sub = Subscription(url=url, handler=lambda m: got.append(m.data), channels=["/records"], max_backoff=0.2)
    sub.start()
    try:
        assert await sub.wait_live(10)
        with caplog.at_level(logging.WARNING, logger="channels.redis"):
            fake.connections[-1].write(b"?this is not RESP\r\n")
            await until(lambda: len(fake.connections) == 2 and sub.live, what="a fresh connection")
        assert any("redis subscription lost" in r.getMessage() for r in caplog.records)
        message = b"*3\r\n$7\r\nmessage\r\n$8\r\n/records\r\n$2\r\nok\r\n"
        fake.connections[-1].write(message)
        await until(lambda: got == [b"ok"], what="a message on the fresh connection")
    finally:
        await sub.stop()
        await fake.close()


async def test_messages_already_read_survive_a_reconnect_while_a_handler_holds_the_feed(private_redis):
    got, gate, handler = held_at(b"0")

    sub = Subscription(url=private_redis.url, handler=handler, channels=["/records"], max_backoff=0.2)
    sub.start()
    client = create_redis(private_redis.url)
    try:
        assert await sub.wait_live(10)
        await publish_burst(client, 5)  # one read: "0" holds, "1".."4" wait behind it
        await asyncio.sleep(0.2)
        assert got == []
        private_redis.kill()
        await until(lambda: not sub.live, what="the subscription to notice")
        private_redis.start()
        assert await sub.wait_live(15)
        await client.aclose()
        client = create_redis(private_redis.url)
        await client.publish("/records", b"after")
        await asyncio.sleep(0.2)
        assert got == []  # still held, and "after" queues behind
        gate.set()
        await until(lambda: len(got) == 6, what="every message")
        assert got == [b"0", b"1", b"2", b"3", b"4", b"after"]
    finally:
        await client.aclose()
        await sub.stop()


async def test_reading_pauses_past_the_hold_limit_and_nothing_is_lost(redis_url, redis, monkeypatch):
    import channels_common.redis as redis_module

    monkeypatch.setattr(redis_module, "_HOLD_LIMIT_BYTES", 1000)
    got, gate, handler = held_at(b"first")

    sub = Subscription(url=redis_url, handler=handler, channels=["/records"])
    sub.start()
    try:
        assert await sub.wait_live(10)
        await redis.publish("/records", b"first")
        await asyncio.sleep(0.1)
        for i in range(200):
            await redis.publish("/records", b"%d" % i + b"x" * 100)
        await until(lambda: sub._link.paused, what="reading to pause")
        assert len(sub._held) < 200  # the rest waits in Redis
        gate.set()
        await until(lambda: len(got) == 201, what="every message")
        assert got == [b"first"] + [b"%d" % i + b"x" * 100 for i in range(200)]
        assert not sub._link.paused
    finally:
        await sub.stop()


async def test_read_clock_gives_the_redis_time_just_before_the_subscribe(redis_url, redis):
    got: list[bytes] = []
    sub = Subscription(url=redis_url, handler=lambda m: got.append(m.data), channels=["/records"], read_clock=True)
    seconds, micros = await redis.time()
    before = int(seconds) * 1000 + int(micros) // 1000
    sub.start()
    try:
        assert await sub.wait_live(10)
        seconds, micros = await redis.time()
        after = int(seconds) * 1000 + int(micros) // 1000
        assert before <= sub.subscribed_at_ms <= after
        assert sub.generation == 1
        await redis.publish("/records", b"first")  # the TIME reply is not taken for a message
        await until(lambda: got == [b"first"], what="the message")
    finally:
        await sub.stop()
    plain = Subscription(url=redis_url, handler=got.append, channels=["/records"])
    plain.start()
    try:
        assert await plain.wait_live(10)
        assert plain.subscribed_at_ms is None and plain.generation == 1
    finally:
        await plain.stop()


async def test_an_epoch_marker_starts_each_subscription_where_everyone_sees_it(redis_url, redis):
    """The marker is the first message of the new subscription and reaches
    the older one at the same place among the other publishes."""
    old: list[Message] = []
    new: list[Message] = []
    first = Subscription(url=redis_url, handler=old.append, channels=["/records"], epoch_channel="t:epoch")
    first.start()
    second = Subscription(url=redis_url, handler=new.append, channels=["/records"], epoch_channel="t:epoch")
    try:
        assert await first.wait_live(10)
        await redis.publish("/records", b"before")
        await until(lambda: len(old) == 2, what="the first marker and a message")
        second.start()
        assert await second.wait_live(10)
        await redis.publish("/records", b"after")
        await until(lambda: len(old) == 4 and len(new) == 2, what="the second marker and a message")
        n1, n2 = int(old[0].data), int(new[0].data)
        assert n2 == n1 + 1 and old[0].channel == "t:epoch" == new[0].channel
        assert [m.data for m in old] == [old[0].data, b"before", new[0].data, b"after"]
        assert [m.data for m in new] == [new[0].data, b"after"]
        assert await redis.get("t:epoch") == new[0].data
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("how", ["refused", "left out"])
async def test_a_redis_that_refuses_the_epoch_marker_gets_a_plain_subscribe_next(caplog, how):
    from tests.support import ScriptedRedis

    in_multi = []

    def refusing(command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"MULTI":
            in_multi.append(True)
            return b"+OK\r\n"
        if name == b"EXEC":
            in_multi.clear()
            if how == "left out":  # confirmations and the script's result, but no marker
                return b"*2\r\n" + _plain_redis([b"SUBSCRIBE", b"/records"]) + b":1\r\n" + _plain_redis(
                    [b"SUBSCRIBE", b"t:epoch"])
            return b"-EXECABORT Transaction discarded because of previous errors.\r\n"
        if in_multi:
            return b"+QUEUED\r\n" if how == "left out" else b"-ERR Command not allowed inside a transaction\r\n"
        return _plain_redis(command)

    fake = ScriptedRedis(refusing)
    url = await fake.start()
    sub = Subscription(url=url, handler=lambda m: None, channels=["/records"], epoch_channel="t:epoch",
                       max_backoff=0.2)
    sub.start()
    try:
        with caplog.at_level(logging.WARNING, logger="channels.redis"):
            assert await sub.wait_live(10)
        assert sub.epoch_channel is None and len(fake.connections) == 2
        assert any("subscribing without" in r.getMessage() for r in caplog.records)
        assert [c for c in fake.commands if c[0].upper() == b"SUBSCRIBE"][-1] == [b"SUBSCRIBE", b"/records"]
    finally:
        await sub.stop()
        await fake.close()


async def test_a_redis_still_loading_keeps_the_epoch_marker_for_the_next_attempt(caplog):
    """Right after a restart Redis answers LOADING to the marker's script:
    "not now", not "never". The next attempt sends the marker again (an
    instance without markers beside one with would log everything twice)."""
    from tests.support import ScriptedRedis

    state = {"loading": True, "in_multi": False}

    def loading_then_ready(command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"MULTI":
            state["in_multi"] = True
            return b"-LOADING Redis is loading the dataset in memory\r\n" if state["loading"] else b"+OK\r\n"
        if name == b"EXEC":
            state["in_multi"] = False
            if state["loading"]:
                state["loading"] = False
                return b"-EXECABORT Transaction discarded because of previous errors.\r\n"
            marker = b"*3\r\n$7\r\nmessage\r\n$7\r\nt:epoch\r\n$1\r\n5\r\n"
            return b"*2\r\n" + _plain_redis([b"SUBSCRIBE", b"/records", b"t:epoch"]) + b":5\r\n" + marker
        if state["in_multi"]:
            return b"-LOADING Redis is loading the dataset in memory\r\n" if state["loading"] else b"+QUEUED\r\n"
        return _plain_redis(command)

    fake = ScriptedRedis(loading_then_ready)
    url = await fake.start()
    got = []
    sub = Subscription(url=url, handler=got.append, channels=["/records"], epoch_channel="t:epoch", max_backoff=0.2)
    sub.start()
    try:
        with caplog.at_level(logging.WARNING, logger="channels.redis"):
            assert await sub.wait_live(10)
        assert sub.epoch_channel == "t:epoch" and len(fake.connections) == 2
        assert [c[0].upper() for c in fake.commands].count(b"MULTI") == 2
        await until(lambda: got, what="the marker")
        assert got[0].channel == "t:epoch" and got[0].data == b"5"
        assert not any("subscribing without" in r.getMessage() for r in caplog.records)
    finally:
        await sub.stop()
        await fake.close()
