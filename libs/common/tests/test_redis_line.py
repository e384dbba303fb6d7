"""RedisLine and BatchedCalls against a real Redis: replies in call order,
error replies per call, concurrent calls sharing round trips, a failed
connection reported to every caller of its batch and replaced."""

from __future__ import annotations

import asyncio

import pytest
from channels_common.redis import create_redis
from channels_common.redis_line import BatchedCalls, RedisLine
from channels_common.resp import pack_command
from redis.exceptions import NoScriptError, RedisError, ResponseError


async def test_concurrent_calls_share_round_trips_in_call_order(redis_url, redis):
    client = create_redis(redis_url)
    line = RedisLine(client, 5.0)
    exchanges = []
    original = line.start

    def counting_start(commands, timeout, on_done):
        exchanges.append(len(commands))
        original(commands, timeout, on_done)

    line.start = counting_start
    calls = BatchedCalls(line)
    try:
        first = await calls.call(pack_command("INCR", "n"))  # opens the connection
        assert first == 1
        exchanges.clear()
        replies = await asyncio.gather(*(calls.call(pack_command("INCR", "n")) for _ in range(200)))
        assert replies == list(range(2, 202))  # in call order
        assert 0 < len(exchanges) < 200 and sum(exchanges) == 200  # batched
        # Error replies fail their own call only.
        bad, good, missing = await asyncio.gather(
            calls.call(pack_command("INCRBY", "n", "x")), calls.call(pack_command("GET", "n")),
            calls.call(pack_command("EVALSHA", "0" * 40, 0)), return_exceptions=True,
        )
        assert isinstance(bad, ResponseError) and good == b"201" and isinstance(missing, NoScriptError)
        assert await calls.call(pack_command("EVAL", "return {'a', false}", 0)) == [b"a", None]
    finally:
        await client.aclose()


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(redis_url, redis):
    client = create_redis(redis_url)
    calls = BatchedCalls(RedisLine(client, 5.0))
    try:
        await calls.call(pack_command("PING"))
        slow = calls.call(pack_command("BLPOP", "nothing", "0.2"))
        queued = [calls.call(pack_command("INCR", "m")) for _ in range(3)]
        queued[1].cancel()
        assert await slow is None
        assert await queued[0] == 1 and await queued[2] == 3  # the cancelled call still ran
    finally:
        await client.aclose()


async def test_a_lost_connection_fails_its_batch_and_the_next_call_reconnects(private_redis):
    client = create_redis(private_redis.url, socket_timeout=1.0)
    calls = BatchedCalls(RedisLine(client, 1.0))
    try:
        assert await calls.call(pack_command("SET", "k", "v")) == b"OK"
        private_redis.kill()
        results = await asyncio.gather(*(calls.call(pack_command("GET", "k")) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, (RedisError, OSError)) for r in results)
        private_redis.start()
        for _ in range(50):
            try:
                assert await calls.call(pack_command("SET", "k", "w")) == b"OK"
                break
            except RedisError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the line never reconnected")
    finally:
        await client.aclose()
