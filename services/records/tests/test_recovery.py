"""The recovery store against a real Redis: offsets, dedup across instances,
sessions, replay, expiry, trimming and cost."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
import redis.asyncio as aioredis
from channels_common.redis import create_redis
from channels_common.redis_line import settles
from channels_common.resp import pack_command
from channels_records.recovery import (
    ZERO_OFFSET,
    LoggedEvent,
    RecoveryStore,
    offset_key,
    parse_offset,
    token_fingerprint,
)
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tests.support import FakeClock

WINDOW = 1800 * 1000  # ms


async def log_message(store: RecoveryStore, room: str, event: str, data: bytes) -> str:
    """One message through the relay's own entry point (log_batch)."""
    future = asyncio.get_running_loop().create_future()
    store.log_batch([(room, event, data)], settles(future))
    (result,) = await future
    if isinstance(result, BaseException):
        raise result
    return result


async def last_offset(redis) -> str:
    """The newest offset handed out, as Redis holds it."""
    value = await redis.get("recovery:last")
    return ZERO_OFFSET if value is None else value.decode()


def log_clock() -> FakeClock:
    """Milliseconds for the log script's ids and trimming (session expiry
    stays on Redis's real clock)."""
    return FakeClock(1_700_000_000_000, per_second=1000)


def record(room: str, n: int) -> bytes:
    return json.dumps({"room": room, "records": {"n": n}}).encode()


def notice(n: int) -> bytes:
    return json.dumps({"notice": n}).encode()


@pytest.fixture
async def clients(redis_url, redis):
    """Separate connections per simulated instance, as separate processes have."""
    made = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    yield made
    for c in made:
        await c.aclose()


def stores(clients, **kw):
    kw.setdefault("window_ms", WINDOW)
    return [RecoveryStore(c, instance_id=f"inst-{i}", **kw) for i, c in enumerate(clients)]


# A message sequence as Rails might publish it; (room, event, data)
def sequence(count: int = 60) -> list[tuple[str, str, bytes]]:
    rng = random.Random(7)
    rooms = ["group-1", "group-2", "user-7", "user-8"]
    msgs = []
    for n in range(count):
        if n % 10 == 9:
            msgs.append(("notice", "notice", notice(n)))
        else:
            room = rng.choice(rooms)
            msgs.append((room, "records", record(room, n)))
    # the same bytes legitimately published again, right after and later on
    msgs.insert(5, msgs[4])
    msgs.insert(30, msgs[4])
    msgs.insert(40, msgs[9])
    return msgs


_jitter = random.Random(11)  # seeded: the same interleaving on every run


async def feed(store: RecoveryStore, msgs, *, yield_every: int = 0) -> list[str]:
    out = []
    for i, (room, event, data) in enumerate(msgs):
        out.append(await log_message(store, room, event, data))
        if yield_every and i % yield_every == 0:
            await asyncio.sleep(_jitter.random() / 1000)
    return out


async def stream(redis, room: str) -> list[tuple[str, str, bytes]]:
    return [
        (ident.decode(), fields[b"e"].decode(), fields[b"d"])
        for ident, fields in await redis.xrange(f"recovery:room:{room}")
    ]


def assert_increasing(offsets: list[str]) -> None:
    keys = [offset_key(o) for o in offsets]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


# -- offsets and dedup ------------------------------------------------------


async def test_offsets_are_global_increasing_and_identical_on_every_instance(clients, redis):
    msgs = sequence()
    a, b, c = stores(clients)
    offs_a = await feed(a, msgs)
    offs_b = await feed(b, msgs)
    offs_c = await feed(c, msgs)
    assert offs_a == offs_b == offs_c
    assert_increasing(offs_a)
    # each message logged exactly once, in its own room's stream, in publish order
    for room in {m[0] for m in msgs}:
        expected = [(o, e, d) for o, (r, e, d) in zip(offs_a, msgs) if r == room]
        assert await stream(redis, room) == expected
    assert await last_offset(redis) == offs_a[-1]


async def test_instances_interleaved_concurrently_agree(clients, redis):
    msgs = sequence(120)
    insts = stores(clients)
    results = await asyncio.gather(*(feed(s, msgs, yield_every=3) for s in insts))
    assert results[0] == results[1] == results[2]
    assert_increasing(results[0])
    total = sum([len(await stream(redis, r)) for r in {m[0] for m in msgs}])
    assert total == len(msgs)


async def test_same_payload_published_twice_is_two_events(clients, redis):
    a, b = stores(clients)[:2]
    data = record("group-1", 1)
    # a sees both occurrences before b sees the first
    a1 = await log_message(a, "group-1", "records", data)
    a2 = await log_message(a, "group-1", "records", data)
    b1 = await log_message(b, "group-1", "records", data)
    b2 = await log_message(b, "group-1", "records", data)
    assert (a1, a2) == (b1, b2)
    assert offset_key(a1) < offset_key(a2)
    assert [e[0] for e in await stream(redis, "group-1")] == [a1, a2]


async def test_same_bytes_in_different_rooms_are_different_messages(clients, redis):
    a, b = stores(clients)[:2]
    data = b'{"x":1}'
    offs_a = [await log_message(a, "group-1", "records", data), await log_message(a, "group-2", "records", data)]
    offs_b = [await log_message(b, "group-1", "records", data), await log_message(b, "group-2", "records", data)]
    assert offs_a == offs_b
    assert offs_a[0] != offs_a[1]


@pytest.mark.parametrize("late_first", [False, True])
async def test_instance_started_later_does_not_reuse_an_old_occurrence(clients, redis, late_first):
    clock = log_clock()
    old = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="old", clock=clock)
    data = notice(1)
    first = await log_message(old, "notice", "notice", data)
    clock.advance(5)
    late = RecoveryStore(clients[1], window_ms=WINDOW, instance_id="late", clock=clock)
    clock.advance(0.01)
    # Rails publishes the same bytes again; both instances receive it
    if late_first:
        from_late = await log_message(late, "notice", "notice", data)
        from_old = await log_message(old, "notice", "notice", data)
    else:
        from_old = await log_message(old, "notice", "notice", data)
        from_late = await log_message(late, "notice", "notice", data)
    assert from_old == from_late != first
    assert len(await stream(redis, "notice")) == 2


async def test_restarted_instance_with_same_id_starts_a_fresh_count(clients, redis):
    clock = log_clock()
    a = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="a", clock=clock)
    b = RecoveryStore(clients[1], window_ms=WINDOW, instance_id="b", clock=clock)
    data = notice(1)
    o1 = await log_message(a, "notice", "notice", data)
    assert await log_message(b, "notice", "notice", data) == o1
    clock.advance(3)
    b = RecoveryStore(clients[1], window_ms=WINDOW, instance_id="b", clock=clock)  # restart
    clock.advance(0.01)
    o2 = await log_message(b, "notice", "notice", data)  # a republish while a lags
    assert await log_message(a, "notice", "notice", data) == o2 != o1


async def test_pub_sub_reconnect_via_mark_live_starts_a_fresh_count(clients, redis):
    a, b = stores(clients, start_grace_ms=50)[:2]
    data = notice(1)
    o1 = await log_message(a, "notice", "notice", data)
    await log_message(b, "notice", "notice", data)
    # b's subscription drops; meanwhile the payload is republished and a logs it
    o2 = await log_message(a, "notice", "notice", data)
    await asyncio.sleep(0.1)  # the start grace (50 ms)
    await b.mark_live()
    o3 = await log_message(a, "notice", "notice", data)
    assert await log_message(b, "notice", "notice", data) == o3
    assert len({o1, o2, o3}) == 3


async def test_concurrent_calls_are_pipelined_in_call_order(clients, redis):
    a, b = stores(clients)[:2]
    msgs = [("group-1", "records", record("group-1", n)) for n in range(300)]
    round_trips = 0
    original = a.log._line.run

    async def counting_run(commands, timeout=None):
        nonlocal round_trips
        round_trips += 1
        return await original(commands, timeout)

    a.log._line.run = counting_run
    offs_a = await asyncio.gather(*(log_message(a, *m) for m in msgs))
    assert_increasing(offs_a)
    assert 0 < round_trips < len(msgs)  # batched: fewer round trips than messages
    assert [e[2] for e in await stream(redis, "group-1")] == [m[2] for m in msgs]
    assert await feed(b, msgs) == offs_a


async def test_a_retried_script_call_is_idempotent(clients, redis):
    a = stores(clients)[0]
    log = a.log
    keys = [a.keys.last, a.keys.room("group-1"), a.keys.dedup("group-1", "records", b"{}")]
    args = [log._me(), log._start_ms, 1, "records", b"{}", a.window_ms, log.dedup_ms, "", 64]
    first = await log._log(redis, keys, args)
    again = await log._log(redis, keys, args)  # the same call, as after a lost reply
    assert first == again
    assert await redis.xlen("recovery:room:group-1") == 1


async def test_script_cache_flush_is_survived(clients, redis):
    a = stores(clients)[0]
    pid, _ = await a.create_session("sid1", "tok", ["notice"])
    o1 = await log_message(a, "notice", "notice", notice(1))
    await redis.script_flush()
    o2 = await log_message(a, "notice", "notice", notice(2))
    await redis.script_flush()
    batch = await asyncio.gather(*(log_message(a, "notice", "notice", notice(n)) for n in range(3, 10)))
    await redis.script_flush()
    restored = await a.restore(pid, "tok", o1)
    assert [e.offset for e in restored.missed] == [o2, *batch]


# -- sessions and replay ------------------------------------------------------


async def test_restore_returns_exactly_the_missed_events_of_the_session_rooms(clients, redis):
    a, b = stores(clients)[:2]
    rooms = ["notice", "user-7", "group-1"]
    pid, _connect = await a.create_session("sid-1", "tok-7", rooms)
    msgs = sequence(80)
    offs = await feed(a, msgs)
    await feed(b, msgs)
    seen = 25  # the client received events up to msgs[seen] (one of its rooms or not)
    restored = await b.restore(pid, "tok-7", offs[seen])
    assert restored.sid == "sid-1"
    assert restored.rooms == rooms
    expected = [
        LoggedEvent(o, e, d) for o, (r, e, d) in zip(offs, msgs) if r in rooms and offset_key(o) > offset_key(offs[seen])
    ]
    assert restored.missed == expected
    assert {r for r, *_ in msgs} - set(rooms)  # other rooms had traffic


async def test_client_that_received_nothing_recovers_from_connect_offset(clients, redis):
    # socket.io#5538: no event received before the drop, so no offset to send
    a = stores(clients)[0]
    before = await log_message(a, "user-7", "records", record("user-7", 0))
    pid, connect = await a.create_session("sid-1", "tok", ["notice", "user-7"])
    assert connect == before
    after = await log_message(a, "user-7", "records", record("user-7", 1))
    restored = await a.restore(pid, "tok", None)
    assert [e.offset for e in restored.missed] == [after]


async def test_session_created_before_any_traffic(clients, redis):
    a = stores(clients)[0]
    assert await last_offset(redis) == ZERO_OFFSET
    pid, connect = await a.create_session("sid-1", None, ["notice"])
    assert connect == ZERO_OFFSET
    o = await log_message(a, "notice", "notice", notice(1))
    restored = await a.restore(pid, None, None)
    assert [e.offset for e in restored.missed] == [o]


async def test_several_restores_in_a_row_each_replay_only_what_is_new(clients, redis):
    # socket.io#4880, #5419
    a, b = stores(clients)[:2]
    pid, _ = await a.create_session("sid-1", "tok", ["notice", "group-1"])
    last = None
    for round_ in range(4):
        msgs = [("group-1", "records", record("group-1", round_ * 10 + n)) for n in range(3)]
        msgs.append(("group-2", "records", record("group-2", round_)))
        offs = await feed(a, msgs)
        await feed(b, msgs)
        restored = await (a if round_ % 2 else b).restore(pid, "tok", last)
        assert [e.offset for e in restored.missed] == offs[:3]
        assert restored.sid == "sid-1"
        last = restored.missed[-1].offset
    # and once more with nothing new
    assert (await a.restore(pid, "tok", last)).missed == []


async def test_restore_long_after_connecting(clients, redis):
    # socket.io-redis-streams-adapter#48 failed past 10 s: nothing here depends on it
    clock = log_clock()
    a = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="a", clock=clock)
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    clock.advance(11)
    first = await log_message(a, "notice", "notice", notice(1))
    clock.advance(600)
    second = await log_message(a, "notice", "notice", notice(2))
    restored = await a.restore(pid, "tok", first)
    assert [e.offset for e in restored.missed] == [second]


async def test_session_older_than_window_stays_while_touched(clients, redis):
    # socket.io#5282: the window counts from the last sign of life, not from connect
    a = stores(clients, window_ms=500)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    idle, _ = await a.create_session("sid-2", "tok", ["notice"])
    for _ in range(3):
        await asyncio.sleep(0.25)
        await a.touch([pid, "no-such-session-0000000"])
    # 0.75 s after connecting, with a 0.5 s window
    o = await log_message(a, "notice", "notice", notice(1))
    restored = await a.restore(pid, "tok", None)
    assert [e.offset for e in restored.missed] == [o]
    assert await a.restore(idle, "tok", None) is None


async def test_restore_extends_the_window(clients, redis):
    a = stores(clients, window_ms=500)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    await asyncio.sleep(0.3)
    assert await a.restore(pid, "tok", None) is not None
    await asyncio.sleep(0.3)
    assert await a.restore(pid, "tok", None) is not None


async def test_expired_window_gives_none(clients, redis):
    a = stores(clients, window_ms=100)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    await log_message(a, "notice", "notice", notice(1))
    assert 0 < await redis.pttl(a.keys.session(pid)) <= 100
    async with asyncio.timeout(5):
        while await redis.exists(a.keys.session(pid)):  # Redis expires it, on its own clock
            await asyncio.sleep(0.02)
    assert await a.restore(pid, "tok", None) is None


async def test_forgotten_session_cannot_be_restored(clients, redis):
    a = stores(clients)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    await a.forget(pid)
    assert await a.restore(pid, "tok", None) is None


async def test_session_on_another_instance_and_after_restart(clients, redis):
    a = stores(clients)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    o = await log_message(a, "notice", "notice", notice(1))
    del a  # process gone; a new one with a new connection
    fresh = RecoveryStore(clients[2], window_ms=WINDOW, instance_id="new")
    restored = await fresh.restore(pid, "tok", None)
    assert [e.offset for e in restored.missed] == [o]


@pytest.mark.parametrize(
    "pid_of, token, offset, reason",
    [
        (lambda pid: "A" * 32, "tok", None, "unknown or expired"),
        (lambda pid: pid, "other", None, "token differs"),
        (lambda pid: pid, None, None, "token differs"),
        (lambda pid: pid, "tok", "not-an-offset", "malformed offset"),
        (lambda pid: pid, "tok", "12", "malformed offset"),
        (lambda pid: pid, "tok", "-1-0", "malformed offset"),
        (lambda pid: pid, "tok", "1-2-3", "malformed offset"),
        (lambda pid: pid, "tok", "99999999999999999-0", "malformed offset"),
        (lambda pid: pid, "tok", 5, "malformed offset"),
        (lambda pid: pid, "tok", {"$gt": ""}, "malformed offset"),
        (lambda pid: pid, "tok", "9999999999999-0", "newer than any"),
        (lambda pid: pid + "'; --", "tok", None, "malformed session id"),
        (lambda pid: None, "tok", None, "malformed session id"),
        (lambda pid: "x", "tok", None, "malformed session id"),
    ],
)
async def test_refusals_give_none_and_never_log_secrets(clients, redis, caplog, pid_of, token, offset, reason):
    a = stores(clients)[0]
    pid, _ = await a.create_session("sid-1", "tok", ["notice"])
    await log_message(a, "notice", "notice", notice(1))
    caplog.set_level(logging.INFO, logger="channels.records.recovery")
    assert await a.restore(pid_of(pid), token, offset) is None
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert reason in text
    assert pid not in text and "tok" not in text.replace("token", "")
    # the session is still good for its owner
    assert await a.restore(pid, "tok", None) is not None


async def test_offset_from_before_the_session_replays_only_the_session(clients, redis):
    # socket.io-client keeps its last offset across a fresh (not recovered)
    # connection and sends it with the new pid if it drops before any event
    a = stores(clients)[0]
    early = await log_message(a, "notice", "notice", notice(1))
    await log_message(a, "notice", "notice", notice(2))
    pid, _connect = await a.create_session("sid-1", "tok", ["notice"])
    later = await log_message(a, "notice", "notice", notice(3))
    restored = await a.restore(pid, "tok", early)
    assert [e.offset for e in restored.missed] == [later]
    restored = await a.restore(pid, "tok", ZERO_OFFSET)
    assert [e.offset for e in restored.missed] == [later]


async def test_too_much_missed_gives_a_fresh_connection(clients, redis):
    a = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="a", max_replay=5)
    pid, _ = await a.create_session("sid-1", "tok", ["notice", "user-1"])
    for n in range(3):
        await log_message(a, "notice", "notice", notice(n))
        await log_message(a, "user-1", "records", record("user-1", n))
    assert await a.restore(pid, "tok", None) is None
    # from a later offset the rest fits
    restored = await a.restore(pid, "tok", await log_message(a, "notice", "notice", notice(9)))
    assert restored is not None and restored.missed == []


async def test_redis_holds_neither_pid_nor_token(clients, redis):
    a = stores(clients)[0]
    pid, _ = await a.create_session("sid-1", "secret-token-value", ["notice", "user-1"])
    blob = b""
    async for key in redis.scan_iter():
        blob += key
        if await redis.type(key) == b"hash":
            for k, v in (await redis.hgetall(key)).items():
                blob += k + v
    assert pid.encode() not in blob
    assert b"secret-token-value" not in blob
    assert token_fingerprint("secret-token-value").encode() in blob


async def test_pids_are_unguessable_and_distinct(clients, redis):
    a = stores(clients)[0]
    pids = {(await a.create_session(f"s{i}", None, ["notice"]))[0] for i in range(50)}
    assert len(pids) == 50
    assert all(len(p) >= 32 for p in pids)


# -- memory and cost -----------------------------------------------------------


async def test_trimming_keeps_streams_and_keys_bounded(clients, redis):
    clock = log_clock()
    a = RecoveryStore(clients[0], window_ms=1000, instance_id="a", clock=clock, dedup_ms=2000)
    for n in range(2000):
        clock.advance(0.01)  # 100 messages per simulated second, 20 s in all
        await log_message(a, "group-1", "records", record("group-1", n))
    pid, _ = await a.create_session("sid-1", "tok", ["group-1"])
    length = await redis.xlen("recovery:room:group-1")
    # one window of messages, plus at most one stream node (100 entries) of slack
    assert 100 <= length <= 100 + 101
    first = (await redis.xrange("recovery:room:group-1", count=1))[0][0].decode()
    assert offset_key(first)[0] >= clock.now - 1000 - 1100
    assert 0 < await redis.pttl("recovery:room:group-1") <= 1000
    assert 0 < await redis.pttl(a.keys.session(pid)) <= 1000
    dedup = [k async for k in redis.scan_iter(match="recovery:dedup:*")]
    assert dedup
    for key in dedup[:50]:
        assert 0 < await redis.pttl(key) <= 2000


async def test_dedup_state_of_a_repeated_payload_stays_small(clients, redis):
    a, _b = stores(clients)[:2]
    data = notice(0)
    for _ in range(200):
        await log_message(a, "notice", "notice", data)
    key = a.keys.dedup("notice", "notice", data)
    assert await redis.hlen(key) <= 2 * 64 + 10
    assert await redis.xlen("recovery:room:notice") == 200


async def test_restore_reads_only_the_session_rooms_after_the_offset(clients, redis):
    a = stores(clients, max_events_per_room=0)[0]  # no cap: the noise room stays large
    rooms = ["notice", "user-1", "group-1"]
    pid, _ = await a.create_session("sid-1", "tok", rooms)
    noise = [("group-2", "records", record("group-2", n)) for n in range(3000)]
    await asyncio.gather(*(log_message(a, *m) for m in noise[:1500]))
    seen = await log_message(a, "group-1", "records", record("group-1", 0))
    await asyncio.gather(*(log_message(a, *m) for m in noise[1500:]))
    missed = [await log_message(a, "user-1", "records", record("user-1", n)) for n in range(3)]
    await redis.config_resetstat()
    restored = await a.restore(pid, "tok", seen)
    assert [e.offset for e in restored.missed] == missed
    stats = await redis.info("commandstats")
    # one round trip; one range read per session room; nothing that walks all traffic
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_xrange"]["calls"] == len(rooms)
    for cmd in ("xread", "xrevrange", "scan", "keys", "xlen", "xinfo"):
        assert f"cmdstat_{cmd}" not in stats
    # and the noise room's stream is large, so a scan would have shown up in entries returned
    assert await redis.xlen("recovery:room:group-2") == 3000


# -- Redis outages --------------------------------------------------------------


async def test_log_raises_during_an_outage_and_works_after(private_redis):
    client = create_redis(private_redis.url, socket_timeout=1.0)
    a = RecoveryStore(client, window_ms=WINDOW, instance_id="a", log_timeout_seconds=0.5)
    try:
        pid, _ = await a.create_session("sid-1", "tok", ["notice"])
        o1 = await log_message(a, "notice", "notice", notice(1))
        private_redis.kill()
        with pytest.raises(RedisError):
            await log_message(a, "notice", "notice", notice(2))
        private_redis.start()

        async def log_again():
            while True:
                try:
                    return await log_message(a, "notice", "notice", notice(3))
                except RedisError:
                    await asyncio.sleep(0.2)

        o3 = await asyncio.wait_for(log_again(), 30)
        # Redis came back empty (no persistence): offsets still increase
        assert offset_key(o3) > offset_key(o1)
        assert await a.restore(pid, "tok", None) is None  # the session went with Redis
    finally:
        await client.aclose()


async def test_log_connection_cut_by_redis_is_replaced(clients, redis):
    a = stores(clients)[0]
    o1 = await log_message(a, "notice", "notice", notice(1))
    # Every client connection but this test's own.
    await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    offsets = []
    for n in range(2, 5):
        try:
            offsets.append(await log_message(a, "notice", "notice", notice(n)))
        except RedisError:
            pass  # the call that found its connection gone
    assert len(offsets) >= 2
    assert_increasing([o1, *offsets])


async def test_log_errors_reach_the_caller_and_the_line_carries_on(clients, redis):
    a = stores(clients)[0]
    (reply,) = await a.log._line.run([pack_command("EVALSHA", "0" * 40, 0)])
    assert isinstance(reply, NoScriptError)
    (reply,) = await a.log._line.run([pack_command("INCRBY", "x", "not a number")])
    assert isinstance(reply, ResponseError) and not isinstance(reply, NoScriptError)
    assert await a.log._line.run([pack_command("SET", "x", "1"), pack_command("GET", "x")]) == [b"OK", b"1"]


# -- pure helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("0-0", (0, 0)),
        ("1700000000000-5", (1700000000000, 5)),
        ("1700000000000", None),
        ("1700000000000-", None),
        ("-5", None),
        (" 1-2", None),
        ("1-2\n", None),
        ("1.5-2", None),
        ("0x1-2", None),
        ("١-٢", None),  # non-ASCII digits
        ("99999999999999999-0", None),
        ("9007199254740992-0", None),
        (None, None),
        (12, None),
        (["1-2"], None),
    ],
)
def test_parse_offset(text, parsed):
    assert parse_offset(text) == parsed


def test_offsets_order_numerically_not_as_text():
    assert offset_key("999-0") < offset_key("1000-0")
    assert offset_key("5-9") < offset_key("5-10")


def test_token_fingerprint():
    assert token_fingerprint("a") == token_fingerprint("a")
    assert token_fingerprint("a") != token_fingerprint("b")
    assert token_fingerprint(None) != token_fingerprint("none")
    assert len(token_fingerprint("a")) == 64


async def test_room_names_outside_ascii_and_empty_room_lists(clients, redis):
    a, b = stores(clients)[:2]
    pid, _ = await a.create_session("sid-1", "tok", ["group-é", "notice", "group-é"])
    o = await log_message(a, "group-é", "records", b'{"room":"group-\\u00e9"}')
    assert await log_message(b, "group-é", "records", b'{"room":"group-\\u00e9"}') == o
    restored = await b.restore(pid, "tok", None)
    assert restored.rooms == ["group-é", "notice"]
    assert [e.offset for e in restored.missed] == [o]
    empty, _ = await a.create_session("sid-2", None, [])
    restored = await a.restore(empty, None, None)
    assert restored.rooms == [] and restored.missed == []


async def test_a_garbled_log_reply_fails_that_call_and_the_next_one_gets_a_fresh_connection():
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tests.support import ScriptedRedis

    evals = []

    def answer(command):
        if command[0].upper() == b"PING":
            return b"+PONG\r\n"  # redis-py's health check
        if command[0].upper() != b"EVALSHA":
            return b"+OK\r\n"
        evals.append(command)
        return b"?garbage\r\n" if len(evals) == 1 else b"$15\r\n1700000000000-0\r\n"

    fake = ScriptedRedis(answer)
    url = await fake.start()
    client = create_redis(url)
    store = RecoveryStore(client, window_ms=WINDOW, instance_id="x")
    try:
        with pytest.raises(RedisConnectionError):
            await log_message(store, "group-1", "records", b"{}")
        assert await log_message(store, "group-1", "records", b"{}") == "1700000000000-0"
        assert len(fake.connections) == 2  # the garbled one was dropped
        assert await log_message(store, "group-1", "records", b"{}") == "1700000000000-0"
        assert len(fake.connections) == 2  # and the fresh one kept
    finally:
        await client.aclose()
        await fake.close()


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
async def test_a_log_connection_that_dies_while_idle_goes_back_to_the_pool(private_redis):
    client = create_redis(private_redis.url, max_connections=2, pool_timeout=3.0)
    store = RecoveryStore(client, window_ms=WINDOW, instance_id="x")

    async def log_once_redis_answers() -> str:
        # Right after a restart a call may fail (the script is gone, pooled
        # connections are stale): the relay then emits without an offset.
        for _ in range(20):
            try:
                return await log_message(store, "group-1", "records", b"{}")
            except RedisError:
                await asyncio.sleep(0.1)
        raise AssertionError("the log never worked again")

    try:
        for _ in range(4):  # more outages than the pool has connections
            await log_once_redis_answers()
            private_redis.kill()
            private_redis.start()
            await asyncio.sleep(0.2)  # the idle log connection sees its end
        assert await log_once_redis_answers()
        assert len(client.connection_pool._in_use_connections) <= 1
    finally:
        await client.aclose()


# -- the per-room cap ------------------------------------------------------------


async def test_the_per_room_cap_bounds_each_stream(clients, redis):
    a = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="a", max_events_per_room=100)
    for n in range(450):
        await log_message(a, "group-1", "records", record("group-1", n))
    length = await redis.xlen("recovery:room:group-1")
    assert 100 <= length <= 100 + 101  # approximate: whole stream nodes go


async def test_a_client_that_missed_more_than_the_cap_is_refused_whole(clients, redis, caplog):
    a = RecoveryStore(clients[0], window_ms=WINDOW, instance_id="a", max_events_per_room=100)
    pid, _ = await a.create_session("sid-1", "tok", ["group-1", "notice"])
    offsets = [await log_message(a, "group-1", "records", record("group-1", n)) for n in range(450)]
    await log_message(a, "notice", "notice", notice(1))
    with caplog.at_level(logging.INFO, logger="channels.records.recovery"):
        assert await a.restore(pid, "tok", offsets[10]) is None  # entries after it were trimmed
        assert await a.restore(pid, "tok", None) is None  # from the connect offset: the same
    reasons = [getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "recovery refused"]
    assert reasons == ["missed more events than the log holds"] * 2
    # One that missed fewer than the log holds gets exactly what it missed.
    restored = await a.restore(pid, "tok", offsets[400])
    assert [e.offset for e in restored.missed][:49] == offsets[401:]
    assert [json.loads(e.data) for e in restored.missed][-1] == {"notice": 1}
    assert len(restored.missed) == 50


async def test_open_session_reads_the_token_and_restores_the_rooms_it_gives(clients, redis):
    a = stores(clients)[0]
    await redis.set("/current_users/tok-o", json.dumps({"id": 7, "name": "N", "group_ids": [3, 3, 4, "x", True]}))
    pid, offset, raw = await a.open_session("sid-o", "tok-o")
    assert json.loads(raw)["id"] == 7 and offset == ZERO_OFFSET
    logged = {}
    for room in ("notice", "user-7", "group-3", "group-4", "group-5", "user-8"):
        logged[room] = await log_message(a, room, "records", record(room, 0))
    restored = await a.restore(pid, "tok-o", None)
    assert restored.sid == "sid-o"
    assert restored.rooms == ["notice", "user-7", "group-3", "group-4"]
    assert [e.offset for e in restored.missed] == [logged[r] for r in ("notice", "user-7", "group-3", "group-4")]
    assert await a.restore(pid, "other-token", None) is None
    # an unknown token: a session with notices only
    pid2, _, raw2 = await a.open_session("sid-u", "no-such-token")
    assert raw2 is None
    assert (await a.restore(pid2, "no-such-token", None)).rooms == ["notice"]


async def redis_ms(redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_an_occurrence_logged_just_before_an_instance_listens_is_never_its_next_one(clients, redis):
    """Issue 25: Rails republished a payload while this instance restarted.
    The occurrence logged before it subscribed (here 1 ms before, well inside
    the old start grace) is not one it will see: its first sighting is the
    next occurrence, whose offset every instance shares."""
    a, b = stores(clients)[:2]
    data = record("group-1", 1)
    o1 = await log_message(a, "group-1", "records", data)
    await asyncio.sleep(0.002)
    b.listening_since(await redis_ms(redis))  # b's SUBSCRIBE goes through now
    o2 = await log_message(b, "group-1", "records", data)
    assert await log_message(a, "group-1", "records", data) == o2 != o1
    # and the other way round: the instance that kept listening logs first
    o3 = await log_message(a, "group-1", "records", data)
    assert await log_message(b, "group-1", "records", data) == o3
    assert [e[0] for e in await stream(redis, "group-1")] == [o1, o2, o3]


async def test_within_an_epoch_every_instance_counts_from_zero(clients, redis):
    """Issue 25: a restarted instance (c) begins epoch 2 with its marker;
    the others switch at the same place in the pub/sub order. Occurrences of
    epoch 1, even logged late by a lagging instance (b), are never taken for
    epoch 2's, and epoch 2's first occurrence is every instance's first."""
    a, b, c = stores(clients)
    data = record("group-1", 1)
    a.set_epoch(1)
    b.set_epoch(1)
    o1 = await log_message(a, "group-1", "records", data)
    for s in (a, c):
        s.set_epoch(2)
    o2 = await log_message(a, "group-1", "records", data)  # published after c's marker
    assert await log_message(c, "group-1", "records", data) == o2 != o1
    assert await log_message(b, "group-1", "records", data) == o1  # b lags: epoch 1's occurrence
    b.set_epoch(2)
    assert await log_message(b, "group-1", "records", data) == o2
    o3 = await log_message(c, "group-1", "records", data)  # c first this time
    assert await log_message(a, "group-1", "records", data) == o3
    assert await log_message(b, "group-1", "records", data) == o3
    assert [e[0] for e in await stream(redis, "group-1")] == [o1, o2, o3]


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
async def test_mark_live_across_a_redis_restart_retries_with_a_warning_and_ends_on_the_redis_clock(
    private_redis, caplog
):
    """The subscription can come back before the pool's connections notice
    the restart (a stale connection, Redis still loading): mark_live keeps
    asking Redis for its clock, with a one-line warning per failure and no
    traceback, and ends with a mark from it."""
    pooled = create_redis(private_redis.url, max_connections=2)
    store = RecoveryStore(pooled, window_ms=WINDOW, instance_id="a", start_grace_ms=50)
    try:
        await pooled.ping()  # a pooled connection, stale once Redis restarts
        private_redis.kill()
        store.log._start_ms = 0  # an old mark, to be replaced
        back = asyncio.Event()
        restarted_at = []

        def restart():
            import time as _time

            _time.sleep(1.0)  # longer than the pool's own retries
            # Redis runs on this machine's clock: no answer from it predates this.
            restarted_at.append(int(_time.time() * 1000))
            private_redis.start()

        loop = asyncio.get_running_loop()
        restarter = loop.run_in_executor(None, restart)
        restarter.add_done_callback(lambda _: loop.call_soon_threadsafe(back.set))
        with caplog.at_level(logging.WARNING, logger="channels.records.recovery"):
            await asyncio.wait_for(store.mark_live(), 30)
        await back.wait()
        seconds, micros = await pooled.time()
        now = seconds * 1000 + micros // 1000
        assert restarted_at[0] - 50 <= store.log._start_ms <= now - 50
        warnings = [r for r in caplog.records if "redis clock unavailable" in r.getMessage()]
        assert warnings and all(r.exc_info is None for r in warnings)
    finally:
        await pooled.aclose()
